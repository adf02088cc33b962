"""Every command the README shows exists and parses; the set-up names an unsupported Python."""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from service_runtime import load_service

SERVICE_SCRIPTS = {"agent.py": "AgentArgs", "supervisor.py": "SupervisorArgs", "storage.py": "StorageArgs"}


def readme_commands() -> list[str]:
    """The command lines of the README's bash blocks, without comments."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    lines = [line.split(" #")[0].strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def test_readme_has_commands() -> None:
    assert len(readme_commands()) >= 10


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_exists_and_parses(command: str) -> None:
    words = shlex.split(command)
    while words and re.match(r"^[A-Z_]+=", words[0]):  # environment assignments
        words = words[1:]
    if words[0] in (".", "source"):
        assert (ROOT / words[1]).is_file(), command
    elif words[0].startswith("./"):
        script = ROOT / words[0]
        assert script.is_file() and os.access(script, os.X_OK), command
    elif words[:2] == ["python", "-m"]:
        assert importlib.util.find_spec(words[2]) is not None, command
    elif words[0] == "python" and words[1] in SERVICE_SCRIPTS:
        # The real parsing: command line, config file and the service's args.
        module = importlib.import_module(words[1][: -len(".py")])
        argv = [str(ROOT / word) if word.endswith(".json") else word for word in words[2:]]
        spec, _ = load_service("README check", getattr(module, SERVICE_SCRIPTS[words[1]]), argv)
        assert spec.config.name == words[-1]
    elif words[0] == "python":
        assert (ROOT / words[1]).is_file(), command
        result = subprocess.run(
            [sys.executable, words[1], *words[2:], "--help"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
    else:
        pytest.fail(f"the README shows a command this test does not know how to check: {command}")


def test_setup_names_an_unsupported_python(tmp_path: Path) -> None:
    # Only a python3 that is too new: the set-up must say so instead of failing later.
    fake = tmp_path / "python3"
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    result = subprocess.run(
        ["/bin/bash", "-c", ". ./env.sh && supported_python"],
        cwd=ROOT,
        env={"PATH": str(tmp_path), "HOME": os.environ.get("HOME", "/")},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode != 0
    assert "farm-ng-core 2.3.2 needs CPython 3.8 to 3.12" in result.stderr
    assert "PYTHON=" in result.stderr
