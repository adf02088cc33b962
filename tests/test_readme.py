"""The README: every command exists and parses, every line it points at says what it quotes."""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import ROOT

from propagation.cli import load

README = (ROOT / "README.md").read_text()
SERVICE_SCRIPTS = {"agent.py": "AgentArgs", "supervisor.py": "SupervisorArgs", "storage.py": "StorageArgs"}


def readme_commands() -> list[str]:
    """The command lines of the README's bash blocks, without comments."""
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    lines = [line.split(" #")[0].strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def test_readme_has_commands() -> None:
    assert len(readme_commands()) >= 15


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_exists_and_parses(command: str) -> None:
    words = shlex.split(command)
    while words and re.match(r"^[A-Z_]+=", words[0]):  # environment assignments
        words = words[1:]
    files = [word for word in words if word.endswith((".json", ".sh"))]
    assert all((ROOT / file).is_file() for file in files), command
    if words[0] in (".", "source"):
        assert (ROOT / words[1]).is_file(), command
    elif words[0].startswith("./"):
        script = ROOT / words[0]
        assert script.is_file() and os.access(script, os.X_OK), command
    elif words[:2] == ["python", "-m"] and words[2].startswith("tools."):
        # The tool's own parser reads the arguments, as it would at run time.
        importlib.import_module(words[2]).build_parser().parse_args(words[3:])
    elif words[:2] == ["python", "-m"]:
        assert importlib.util.find_spec(words[2]) is not None, command
    elif words[0] == "python" and words[1] in SERVICE_SCRIPTS:
        # The real parsing: command line, config file and the service's args.
        module = importlib.import_module(words[1][: -len(".py")])
        argv = [str(ROOT / word) if word.endswith(".json") else word for word in words[2:]]
        spec = load("README check", getattr(module, SERVICE_SCRIPTS[words[1]]), argv, script=words[1])
        assert spec.entry.name == words[-1]
    else:
        pytest.fail(f"the README shows a command this test does not know how to check: {command}")


def line_references() -> list[tuple[str, int, str]]:
    """``[file#L12](file#L12) `code` `` in the README: the file, the line, the code quoted."""
    found = re.findall(r"\[([\w./]+)#L(\d+)\]\(\1#L\2\) `([^`]+)`", README)
    return [(file, int(line), code) for file, line, code in found]


def test_readme_points_at_lines() -> None:
    assert len(line_references()) >= 9


@pytest.mark.parametrize(("file", "line", "code"), line_references())
def test_a_line_reference_shows_that_line(file: str, line: int, code: str) -> None:
    lines = (ROOT / file).read_text().splitlines()
    assert lines[line - 1].strip() == code, f"{file} line {line} is now: {lines[line - 1].strip()!r}"


def test_readme_links_exist() -> None:
    targets = re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", README)
    missing = [target for target in targets if not (ROOT / target).exists()]
    assert not missing


# A call by one of farm-ng-core's own names: its service, its client, and their methods.
FARM_NG_CORE_CALL = re.compile(
    r"\b(EventServiceGrpc|EventClient)\(|\.(add_request_reply_handler|publish|request_reply|subscribe)\("
)


def test_role_files_read_like_the_original() -> None:
    # The farm-ng-core story first: a reader meets its first call within 50 lines of the
    # top (farm-ng's originals: 40, 40, 39), all imports first, and the file stays short.
    for script in SERVICE_SCRIPTS:
        lines = (ROOT / script).read_text().splitlines()
        first_call = next(number for number, line in enumerate(lines, 1) if FARM_NG_CORE_CALL.search(line))
        assert first_call <= 50, (script, first_call)
        last_import = max(number for number, line in enumerate(lines, 1) if line.startswith(("import ", "from ")))
        first_code = next(number for number, line in enumerate(lines, 1) if line.startswith(("class ", "def ", "@")))
        assert last_import < first_code, script
        assert len(lines) <= 210, (script, len(lines))


def test_setup_names_an_unsupported_python(tmp_path: Path) -> None:
    # Only a python3 that is too new: the set-up must say so instead of failing later.
    fake = tmp_path / "python3"
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    result = run_setup(tmp_path, "supported_python", {})
    assert result.returncode != 0
    assert "farm-ng-core 2.3.2 needs CPython 3.8 to 3.12" in result.stderr
    assert "PYTHON=" in result.stderr


def run_setup(tmp_path: Path, command: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["/bin/bash", "-c", f". tools/env.sh && {command}"],
        cwd=ROOT,
        env={"PATH": str(tmp_path), "HOME": os.environ.get("HOME", "/"), **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def fake_python(tmp_path: Path, version: str) -> Path:
    """A 'python' that reports ``version`` and is not a CPython the set-up accepts unless 3.8-3.12."""
    major, minor = version.split(".")
    fake = tmp_path / f"python{version}"
    fake.write_text(
        "#!/bin/sh\n"
        f'case "$*" in *"sys.exit"*) [ {minor} -ge 8 ] && [ {minor} -le 12 ]; exit $?;; esac\n'
        f'case "$*" in *"print"*) echo "{major}.{minor}"; exit 0;; esac\n'
        f'echo "Python {version}.0"\n'
    )
    fake.chmod(0o755)
    return fake


def test_python_naming_an_unsupported_or_missing_interpreter_is_an_error(tmp_path: Path) -> None:
    too_new = fake_python(tmp_path, "3.13")
    result = run_setup(tmp_path, "supported_python", {"PYTHON": str(too_new)})
    assert result.returncode != 0
    assert f"error: PYTHON={too_new} is Python 3.13" in result.stderr
    result = run_setup(tmp_path, "supported_python", {"PYTHON": "python3.99"})
    assert result.returncode != 0
    assert "error: PYTHON=python3.99: no such program" in result.stderr


def test_a_venv_of_an_unsupported_python_is_explained(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(fake_python(tmp_path, "3.13"))
    result = run_setup(tmp_path, f"ensure_venv {venv} requirements.txt", {})
    assert result.returncode != 0
    assert f"error: {venv} has Python 3.13" in result.stderr
    assert f"rm -rf {venv}" in result.stderr


def test_run_sh_help_documents_its_options() -> None:
    result = subprocess.run([str(ROOT / "run.sh"), "--help"], capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0
    assert result.stdout.startswith("usage: ./run.sh")
    for option in ("--setup", "--service-config", "--restart", "--monitor", "--help"):
        assert option in result.stdout


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (
            ["docs/pause_config.json"],
            "./run.sh takes no file name without an option: to start docs/pause_config.json,"
            " run ./run.sh --service-config docs/pause_config.json",
        ),
        (["--service-config"], "--service-config needs a file"),
        (["--monitr"], "unknown option --monitr"),
    ],
)
def test_run_sh_refuses_bad_arguments_in_its_own_words(args: list[str], error: str) -> None:
    # Before any set-up, and speaking of ./run.sh, not of the launcher it runs.
    result = subprocess.run([str(ROOT / "run.sh"), *args], capture_output=True, text=True, timeout=30, check=False)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == f"error: {error} (./run.sh --help lists the options)\n"


def test_a_pyenv_python_that_is_installed_but_not_selected_is_found() -> None:
    # PYTHON=python3.10 ./run.sh --setup: pyenv's shim answers only for a selected version.
    if shutil.which("pyenv") is None:
        pytest.skip("no pyenv here")
    installed = subprocess.run(["pyenv", "versions", "--bare"], capture_output=True, text=True, check=True).stdout
    current = subprocess.run(["pyenv", "version-name"], capture_output=True, text=True, check=False).stdout.strip()
    others = [v for v in installed.split() if re.fullmatch(r"3\.(8|9|10|11|12)\.\d+", v) and v != current]
    if not others:
        pytest.skip("no other supported Python installed in pyenv")
    minor = ".".join(others[0].split(".")[:2])
    env = {key: value for key, value in os.environ.items() if key != "PYENV_VERSION"}
    env["PYTHON"] = f"python{minor}"
    command = '. tools/env.sh && "$(supported_python)" -c "import sys; print(sys.version_info[:2])"'
    result = subprocess.run(
        ["/bin/bash", "-c", command], cwd=ROOT, env=env, capture_output=True, text=True, check=False
    )
    assert result.stdout == f"({minor.replace('.', ', ')})\n", result.stderr
