"""Imported first by every script that needs ``.venv``: without its packages, one line says how to get them.

    import propagation.venv  # noqa: F401  (first: ...)

Run with a Python that lacks farm-ng-core (``python3 agent.py``, ``python3 -m tools.monitor``
outside ``.venv``), a script would end in a ``ModuleNotFoundError`` traceback. Importing
this module first ends it instead with ``error: ... run ./run.sh --setup, then .
.venv/bin/activate`` and exit code 1. Importing it is the check: the import has to come
before the others, which pyproject.toml's isort section ``venv`` keeps in place. Standard
library only, and quick: it looks the packages up without loading them.
"""

from __future__ import annotations

import importlib.util
import os
import sys

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


require()
