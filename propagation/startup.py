"""Imported first by every script, before gRPC loads (pyproject.toml's isort section ``startup``).

When the program running is one of this repository's scripts (not a test that imports
``agent`` for its args):

- Ctrl-C, SIGTERM and SIGHUP end the process quietly with code 0 while the libraries load
  (seconds on a busy machine), until the script takes them over;
- gRPC's C core is kept to errors (it reads ``GRPC_VERBOSITY`` once, as it loads);
- a Python without the packages of requirements.txt (``python3 agent.py`` outside ``.venv``)
  ends with one ``error:`` line saying how to get them, not a ``ModuleNotFoundError``.

Standard library only, and quick: it looks the packages up without loading them.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from propagation.cli import quiet_signals

REQUIRED = ("farm_ng", "grpc", "google.protobuf", "psutil", "rich")  # requirements.txt's, as imported
HOW = "run ./run.sh --setup, then . .venv/bin/activate"


def require(
    modules: tuple[str, ...] = REQUIRED, what: str = "the packages of requirements.txt", how: str = HOW
) -> None:
    """Exits with one ``error:`` line and code 1 if this Python lacks one of ``modules`` (``what``, for the line)."""
    absent = [module for module in modules if not _importable(module)]
    if absent:
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)  # python -m tools.monitor: its module's name
        script = spec.name if spec is not None else os.path.basename(sys.argv[0] if sys.argv else "") or "this script"
        print(f"error: {script} needs {what} ({absent[0]} is missing from {sys.executable}): {how}", file=sys.stderr)
        sys.exit(1)


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # its parent package is missing ("google" for google.protobuf)
        return False


_main = getattr(sys.modules.get("__main__"), "__file__", None)
if _main is not None and Path(__file__).resolve().parent.parent in Path(_main).resolve().parents:
    quiet_signals()
    # From grpcio 1.7x the core writes a line at INFO on stderr whenever a peer's server goes
    # away (``Got goaway ... Cancelling all calls``): noise in a service's output and the monitor's.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    require()
