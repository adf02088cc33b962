"""Imported first by every script, for what must happen before gRPC and farm-ng-core load.

    import propagation.startup  # noqa: F401  (first: before gRPC and farm-ng-core load)

Importing it is the point (pyproject.toml's isort section ``startup`` keeps it first), when
the program running is one of this repository's scripts (a test that imports ``agent`` for
its args is not):

- Ctrl-C, SIGTERM and SIGHUP end the process quietly with code 0 while the libraries
  load (seconds on a busy machine), until the script takes them over;
- gRPC's C core is kept to errors: it reads ``GRPC_VERBOSITY`` once, when it loads, and
  from grpcio 1.7x writes a line at INFO on stderr whenever a peer's server goes away;
- a Python without the packages of requirements.txt (``python3 agent.py`` outside
  ``.venv``) ends with one ``error:`` line saying how to get them, not a
  ``ModuleNotFoundError`` traceback.

Standard library only, and quick: it looks the packages up without loading them.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from propagation.cli import quiet_grpc_core, quiet_signals

# What requirements.txt installs, by the names they are imported as.
REQUIRED = ("farm_ng", "grpc", "google.protobuf", "psutil", "rich")
HOW = "run ./run.sh --setup, then . .venv/bin/activate"


def missing(modules: tuple[str, ...] = REQUIRED) -> list[str]:
    """The modules of ``modules`` this Python cannot import."""
    absent = []
    for module in modules:
        try:
            found = importlib.util.find_spec(module) is not None
        except ImportError:  # its parent package is missing ("google" for google.protobuf)
            found = False
        if not found:
            absent.append(module)
    return absent


def require(
    modules: tuple[str, ...] = REQUIRED, what: str = "the packages of requirements.txt", how: str = HOW
) -> None:
    """Exits with one ``error:`` line and code 1 if this Python lacks one of ``modules`` (``what``, for the line)."""
    absent = missing(modules)
    if absent:
        main = sys.modules.get("__main__")
        spec = getattr(main, "__spec__", None)  # python -m tools.monitor: its module's name
        script = spec.name if spec is not None else os.path.basename(sys.argv[0] if sys.argv else "") or "this script"
        print(f"error: {script} needs {what} ({absent[0]} is missing from {sys.executable}): {how}", file=sys.stderr)
        sys.exit(1)


def running_our_script() -> bool:
    """Whether the program running is a script of this repository (``agent.py``, ``tools/monitor.py``)."""
    script = getattr(sys.modules.get("__main__"), "__file__", None)
    return script is not None and Path(__file__).resolve().parent.parent in Path(script).resolve().parents


if running_our_script():
    quiet_signals()
    quiet_grpc_core()
    require()
