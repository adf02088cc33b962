"""Bad input on the command line: one line naming the problem, exit 1, no traceback, no hang.

Each kind of problem is checked in-process in test_config.py; here each script shows that
it turns one into its one line, before gRPC and farm-ng-core load.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import ROOT, STARTUP_TIMEOUT_S, WAIT_TIMEOUT_S, Services, port_of, write_config


def fails_with(services: Services, script: str, config: Path | str, name: str, *expected: str) -> str:
    """Runs a script that must refuse its input; returns the one line it printed."""
    process = services.run(script, "--service-config", str(config), "--service-name", name)
    code = process.wait_exit(WAIT_TIMEOUT_S)
    lines = [line for line in process.lines if line.strip()]
    assert code != 0, process.output
    assert len(lines) == 1, process.output
    assert "Traceback" not in process.output
    assert lines[0].startswith("error: "), lines[0]
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def test_missing_config_file(services: Services, tmp_path: Path) -> None:
    fails_with(services, "agent.py", tmp_path / "nope.json", "agent-1", "nope.json", "does not exist")


def test_invalid_json(services: Services, tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{"configs": [ {"name": "agent-1",, } ]}')
    fails_with(services, "storage.py", path, "storage", "broken.json", "not valid JSON", "line 1")


def test_unknown_service_name(services: Services, tmp_path: Path) -> None:
    fails_with(services, "agent.py", write_config(tmp_path), "agent-9", "'agent-9'", "agent-1")


def entry_with(tmp_path: Path, name: str, **fields: Any) -> Path:
    return write_config(tmp_path, {name: fields})


@pytest.mark.parametrize("problem", ["arg", "port"])
def test_bad_input_is_one_line_and_serves_nothing(tmp_path: Path, problem: str) -> None:
    args = ["max_storage=0", "batch_size=1"] if problem == "arg" else ["max_storage=5", "batch_size=1"]
    config = entry_with(tmp_path, "storage", args=args)
    argv = [sys.executable, str(ROOT / "storage.py"), "--service-config", str(config), "--service-name", "storage"]
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port_of(config, "storage") if problem == "port" else 0))
        squatter.listen()
        # gRPC and farm-ng-core load first (the script reads top to bottom): seconds on a busy machine.
        result = subprocess.run(argv, capture_output=True, text=True, timeout=STARTUP_TIMEOUT_S, check=False)
    expected = (
        "error: service 'storage': arg max_storage=0 must be in 1..2147483647"
        if problem == "arg"
        else f"error: port {port_of(config, 'storage')} on localhost (127.0.0.1) is already in use"
    )
    assert (result.returncode, result.stdout, result.stderr.splitlines()) == (1, "", [expected])


def test_port_out_of_range(services: Services, tmp_path: Path) -> None:
    fails_with(services, "storage.py", entry_with(tmp_path, "storage", port=70000), "storage", "port 70000")


def test_unresolvable_host(services: Services, tmp_path: Path) -> None:
    config = entry_with(tmp_path, "storage", host="no-such-host.invalid")
    fails_with(services, "storage.py", config, "storage", "no-such-host.invalid", "does not resolve")


def test_port_in_use(services: Services, tmp_path: Path) -> None:
    config = write_config(tmp_path)
    port = port_of(config, "storage")
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        fails_with(services, "storage.py", config, "storage", f"port {port}", "already in use")


def test_port_in_use_by_a_running_service(services: Services, tmp_path: Path) -> None:
    # gRPC sets SO_REUSEPORT by default: without care the second would start silently.
    config = write_config(tmp_path)
    first = services.service(config, "storage")
    fails_with(services, "storage.py", config, "storage", f"port {port_of(config, 'storage')}", "already in use")
    assert first.popen.poll() is None


def test_subscription_to_unknown_service(services: Services, tmp_path: Path) -> None:
    subscriptions = [{"uri": {"path": "/sample", "query": "service_name=agent-7"}, "every_n": 1}]
    config = entry_with(tmp_path, "supervisor-1", subscriptions=subscriptions)
    fails_with(services, "supervisor.py", config, "supervisor-1", "service_name=agent-7", "'agent-7' is not in")


def test_subscription_to_other_path(services: Services, tmp_path: Path) -> None:
    subscriptions = [{"uri": {"path": "/health", "query": "service_name=agent-1"}, "every_n": 1}]
    config = entry_with(tmp_path, "supervisor-1", subscriptions=subscriptions)
    fails_with(services, "supervisor.py", config, "supervisor-1", "/health", "must be /sample")


def test_supervisor_without_storage(services: Services, tmp_path: Path) -> None:
    config = write_config(tmp_path, {"storage": None})
    fails_with(services, "supervisor.py", config, "supervisor-1", "'storage' is not in")


def test_missing_flag(services: Services) -> None:
    process = services.run("agent.py", "--service-config", "service_config.json")
    assert process.wait_exit(WAIT_TIMEOUT_S) == 2
    assert "--service-name" in process.output
    assert "Traceback" not in process.output


def test_unused_portless_entry_is_ignored(services: Services, tmp_path: Path) -> None:
    # A recorder entry without a port, as farm-ng-core's recorder writes it, must not
    # stop a supervisor: it builds clients only for the services it talks to.
    config = write_config(tmp_path)
    data = json.loads(config.read_text())
    data["configs"].append({"name": "record_default", "host": "localhost", "port": 0})
    config.write_text(json.dumps(data))
    services.service(config, "supervisor-1")


# ---------------------------------------------------------------------------------
# Config that passed the checks and crashed later (issue 16): one line, before gRPC loads.


@pytest.mark.parametrize(
    ("script", "name", "changes", "expected"),
    [
        # The service's own entry.
        ("storage.py", "storage", {"storage": {"host": "agent..lan"}}, "has host 'agent..lan': it has an empty label"),
        ("agent.py", "agent-1", {"agent-1": {"host": "127.1"}}, "not an IPv4 address as gRPC reads it"),
        ("agent.py", "agent-1", {"agent-1": {"host": "2130706433"}}, "not an IPv4 address as gRPC reads it"),
        # The peers a supervisor connects to: a UnicodeError traceback after gRPC loaded.
        ("supervisor.py", "supervisor-1", {"agent-2": {"host": "."}}, "service 'agent-2' has host '.'"),
        ("supervisor.py", "supervisor-1", {"storage": {"host": "unix"}}, "gRPC reads 'unix:"),
        # Checked in one spelling, run with the other.
        (
            "storage.py",
            "storage",
            {"storage": {"log_level": "INFO", "logLevel": "LOUD"}},
            "gives log_level twice, as 'log_level' and as 'logLevel'",
        ),
        (
            "supervisor.py",
            "supervisor-2",
            {
                "supervisor-2": {
                    "subscriptions": [
                        {"uri": {"path": "/sample", "query": "service_name=agent-3"}, "every_n": 4294967295}
                    ]
                }
            },
            "every_n 4294967295 must be in 0..1000",
        ),
    ],
)
def test_config_that_would_crash_later(
    services: Services, tmp_path: Path, script: str, name: str, changes: dict[str, Any], expected: str
) -> None:
    fails_with(services, script, write_config(tmp_path, changes), name, expected)


@pytest.mark.parametrize(
    ("args", "why"),
    [(["max_storage=500", "batch_size=50"], "its own args"), (["rate=5", "num_tasks=1"], "an agent's args")],
)
def test_a_script_names_the_one_that_runs_an_entry(
    services: Services, tmp_path: Path, args: list[str], why: str
) -> None:
    # With an agent's args, agent.py once ran an agent on storage's port.
    config = entry_with(tmp_path, "storage", args=args)
    line = fails_with(services, "agent.py", config, "storage")
    assert line == "error: service 'storage' is a storage (its name says so): run it with storage.py, not agent.py", why


def test_a_supervisor_is_checked_as_one_whatever_its_name(services: Services, tmp_path: Path) -> None:
    subscriptions = [{"uri": {"path": "/health", "query": "service_name=agent-1"}, "every_n": 1}]
    config = write_config(tmp_path, {"relay-1": {"args": ["confidence=0.5"], "subscriptions": subscriptions}})
    fails_with(
        services, "supervisor.py", config, "relay-1", "service 'relay-1': subscription /health", "must be /sample"
    )


def test_a_capitalised_name_runs_under_its_roles_script(services: Services, tmp_path: Path) -> None:
    config = write_config(tmp_path, {"Storage": {"args": ["max_storage=10", "batch_size=5"]}})
    storage = services.run("storage.py", "--service-config", str(config), "--service-name", "Storage")
    storage.wait_for(r"^Storage serving on ", STARTUP_TIMEOUT_S)
