"""The walkthrough's system, end to end, and the launcher that starts it."""

from __future__ import annotations

import os
import re
import signal
import socket
from pathlib import Path

import pytest
from helpers import STARTUP_TIMEOUT_S, WAIT_TIMEOUT_S, Process, Services, port_of, stats, write_config


def test_walkthrough_propagates(services: Services, tmp_path: Path) -> None:
    config = write_config(tmp_path)
    running = services.system(config)
    running["storage"].wait_for(r"^Storage: \d+/500 \(\d+ remaining\)$", count=20)
    for name in ("supervisor-1", "supervisor-2"):
        running[name].wait_for(r"^Residual: value: \d+$", count=3)
    for name in ("agent-1", "agent-2", "agent-3"):
        running[name].wait_for(r"^Published sample 0\.\d+ from task \d+$", count=3)
        running[name].wait_for(r"^Remainder: \d+$")
    for process in running.values():
        assert "Traceback" not in process.output
        assert not any(line.startswith("INFO:") for line in process.lines), process.output
    # Each line once: farm-ng-core's logging set-up would print every line twice. (Not a
    # count of "Storage: 1/500": after a drain to 0 it comes again.)
    for name, process in running.items():
        assert process.count(rf"^{name} serving on ") == 1, process.output


def test_agents_pause_at_zero(services: Services, tmp_path: Path) -> None:
    # Storage fills in well under a second and drains only when full: agents stop at 0
    # until the next drain.
    config = write_config(
        tmp_path,
        {
            "storage": {"args": ["max_storage=30", "batch_size=30"], "log_level": "INFO"},
            "supervisor-2": {"args": ["confidence=0"]},
            "agent-3": {"args": ["rate=200", "num_tasks=2"]},
        },
    )
    running = services.system(config, ["storage", "supervisor-2", "agent-3"])
    agent = running["agent-3"]
    agent.wait_for(r"^Remainder: 0$", timeout=15)
    # After each "Remainder: 0" each task may finish the publish it had begun, no more.
    lines = agent.lines[:]
    for index, line in enumerate(lines):
        if line == "Remainder: 0":
            after = lines[index + 1 :]
            until_resume = next(
                (i for i, later in enumerate(after) if re.match(r"^Remainder: [1-9]", later)), len(after)
            )
            published = [later for later in after[:until_resume] if later.startswith("Published sample")]
            assert len(published) <= 2, published
    counts = [int(m.group(1)) for m in running["storage"].matches(r"^Storage: (\d+)/30 ")]
    assert max(counts) <= 30


def test_log_level_warning_silences_per_sample_lines(services: Services, tmp_path: Path) -> None:
    config = write_config(tmp_path, {name: {"log_level": "WARNING"} for name in ("storage", "supervisor-2", "agent-3")})
    running = {name: services.service(config, name, wait=False) for name in ("storage", "supervisor-2", "agent-3")}
    # Nothing at INFO, so no start-up line either: wait for storage's stats instead.
    figures = {}
    for _ in range(10):
        figures = stats(config, "storage")
        if figures["accepted"] >= 10:
            break
    assert figures["accepted"] >= 10
    for process in running.values():
        assert process.count(r"^(Storage|Residual|Published|Remainder)") == 0, process.output


# Many processes busy at once: never beside another such test (xdist group).
@pytest.mark.xdist_group("cpu")
def test_launcher_starts_all_and_stops_on_ctrl_c(services: Services, tmp_path: Path) -> None:
    config = write_config(tmp_path)
    launcher = launch(services, config)
    launcher.wait_for(r"^\[launch\] all 6 services are serving", timeout=STARTUP_TIMEOUT_S)
    launcher.wait_for(r"^\[storage\] Storage: \d+/500 \(\d+ remaining\)$")
    launcher.wait_for(r"^\[supervisor-1\] Residual: value: \d+$")
    launcher.wait_for(r"^\[agent-3\] Published sample 0\.\d+ from task 0$")
    starts = [m.group(1) for m in launcher.matches(r"^\[launch\] starting (\S+) \(pid \d+\): python ")]
    assert starts == ["storage", "supervisor-1", "supervisor-2", "agent-1", "agent-2", "agent-3"]
    # Each started once the one before said it serves.
    for before, after in zip(starts, starts[1:]):
        said = launcher.moments(rf"^\[{before}\] {before} serving on ")
        assert said and said[0] <= launcher.moments(rf"^\[launch\] starting {after} ")[0], launcher.output
    launcher.signal(signal.SIGINT)
    assert launcher.wait_exit(WAIT_TIMEOUT_S) == 0, launcher.output
    assert "Traceback" not in launcher.output
    launcher.wait_for(r"^\[launch\] stopped all 6 services$")


# A config of storage and agent-3 only: enough for what the launcher does, and cheap.
STORAGE_AND_AGENT_3 = {name: None for name in ("supervisor-1", "supervisor-2", "agent-1", "agent-2")}


def launch(services: Services, config: Path, *args: str) -> Process:
    """Starts the launcher on ``config``."""
    return services.tool("launch", "--service-config", str(config), *args, label="launch")


def pid_of(launcher: Process, name: str) -> int:
    """The pid the launcher gave for ``name`` when it last (re)started it."""
    pattern = rf"^\[launch\] (re)?starting {name} \(pid (\d+)\)"
    launcher.wait_for(pattern)
    return int(launcher.matches(pattern)[-1].group(2))


# Many processes busy at once: never beside another such test (xdist group).
@pytest.mark.xdist_group("cpu")
def test_the_others_keep_running_when_one_dies(services: Services, tmp_path: Path) -> None:
    config = write_config(tmp_path)
    launcher = launch(services, config)
    launcher.wait_for(r"^\[launch\] all 6 services are serving", timeout=STARTUP_TIMEOUT_S)
    launcher.wait_for(r"^\[agent-2\] Remainder: \d+$")  # its supervisor reached it
    os.kill(pid_of(launcher, "agent-2"), signal.SIGKILL)
    died = launcher.wait_for(r"^\[launch\] agent-2 was killed by SIGKILL; the other 5 keep running$")
    after = next(index for index, line in enumerate(launcher.lines) if died.string == line)
    launcher.wait_for(r"^\[launch\] to start it again: python agent.py --service-config .* --service-name agent-2 ")
    for name in ("agent-1", "agent-3"):
        launcher.wait_for(rf"^\[{name}\] Remainder: \d+$", start=after, count=3)
    # Started again by hand, as the launcher says: its supervisor hears it is back.
    services.service(config, "agent-2")
    launcher.wait_for(r"^\[supervisor-1\] agent-2 is back at ", start=after)
    assert launcher.popen.poll() is None
    launcher.signal(signal.SIGINT)
    assert launcher.wait_exit(WAIT_TIMEOUT_S) == 1, launcher.output  # one died along the way
    launcher.wait_for(r"^\[launch\] stopped the 5 services still running$")


def test_restart_brings_a_service_back_and_gives_up_on_fast_failures(services: Services, tmp_path: Path) -> None:
    config = write_config(tmp_path, {name: None for name in ("supervisor-1", "agent-1", "agent-2")})
    launcher = launch(services, config, "--restart")
    launcher.wait_for(r"^\[launch\] all 3 services are serving", timeout=STARTUP_TIMEOUT_S)
    # Each death right after the service began to serve: a fast failure. The third in a
    # row is the last.
    for attempt, delay in enumerate((1, 2), 1):
        start = len(launcher.lines)
        os.kill(pid_of(launcher, "storage"), signal.SIGKILL)
        launcher.wait_for(rf"^\[launch\] storage was killed by SIGKILL; restarting it in {delay} s$", start=start)
        launcher.wait_for(r"^\[launch\] storage is serving again$", start=start, timeout=STARTUP_TIMEOUT_S)
        launcher.wait_for(r"^\[supervisor-2\] storage is back at ", start=start)  # the next death is news to it
        launcher.wait_for(r"^\[storage\] Storage: \d+/500", start=len(launcher.lines))  # propagating again
        assert launcher.count(r"^\[launch\] restarting storage \(pid \d+\)$") == attempt
    start = len(launcher.lines)
    os.kill(pid_of(launcher, "storage"), signal.SIGKILL)
    launcher.wait_for(
        r"^\[launch\] storage was killed by SIGKILL; it failed 3 times in a row within 10 s of serving:"
        r" not restarting it \(the other 2 keep running\)$",
        start=start,
    )
    launcher.wait_for(r"^\[supervisor-2\] WARNING: storage is unreachable at ", start=start)
    assert launcher.popen.poll() is None, launcher.output
    launcher.signal(signal.SIGTERM)
    assert launcher.wait_exit(WAIT_TIMEOUT_S) == 1, launcher.output
    launcher.wait_for(r"^\[launch\] stopped the 2 services still running$")


def test_the_launcher_ends_when_every_service_is_gone(services: Services, tmp_path: Path) -> None:
    config = write_config(tmp_path, STORAGE_AND_AGENT_3)
    launcher = launch(services, config)
    launcher.wait_for(r"^\[launch\] all 2 services are serving", timeout=STARTUP_TIMEOUT_S)
    os.kill(pid_of(launcher, "agent-3"), signal.SIGKILL)
    launcher.wait_for(r"^\[launch\] agent-3 was killed by SIGKILL; the other 1 keep running$")
    os.kill(pid_of(launcher, "storage"), signal.SIGTERM)
    assert launcher.wait_exit(WAIT_TIMEOUT_S) == 1, launcher.output
    launcher.wait_for(r"^\[launch\] storage exited with code 0; no other is running$")
    launcher.wait_for(r"^\[launch\] every service is gone; nothing left to run$")


def test_a_service_that_logs_above_info_is_ready_when_it_listens(services: Services, tmp_path: Path) -> None:
    # At WARNING it does not print that it serves: its own process listening on its port says it.
    quiet = {"storage": {"log_level": "WARNING"}, **{name: None for name in ("supervisor-1", "agent-1", "agent-2")}}
    launcher = launch(services, write_config(tmp_path, quiet))
    launcher.wait_for(r"^\[launch\] all 3 services are serving", timeout=STARTUP_TIMEOUT_S)
    assert launcher.count(r"^\[storage\] ") == 0, launcher.output
    launcher.wait_for(r"^\[supervisor-2\] Residual: value: \d+$")


def test_launcher_exits_1_when_a_service_does_not_stop(services: Services, tmp_path: Path) -> None:
    config = write_config(tmp_path, STORAGE_AND_AGENT_3)
    launcher = launch(services, config)
    launcher.wait_for(r"^\[launch\] all 2 services are serving", timeout=STARTUP_TIMEOUT_S)
    os.kill(pid_of(launcher, "agent-3"), signal.SIGSTOP)  # deaf to SIGTERM until killed
    launcher.signal(signal.SIGINT)
    assert launcher.wait_exit(WAIT_TIMEOUT_S) == 1, launcher.output
    launcher.wait_for(r"^\[launch\] not stopped cleanly: agent-3 was killed by SIGKILL$")


def test_launcher_fails_when_a_service_cannot_start(services: Services, tmp_path: Path) -> None:
    config = write_config(tmp_path, {"supervisor-2": {"args": ["confidence=2"]}})
    launcher = launch(services, config)
    assert launcher.wait_exit(STARTUP_TIMEOUT_S) == 1, launcher.output
    launcher.wait_for(r"^\[supervisor-2\] error: service 'supervisor-2': arg confidence=2 must be in 0..1$")
    launcher.wait_for(
        r"^\[launch\] supervisor-2 exited with code 1 before serving:"
        r" service 'supervisor-2': arg confidence=2 must be in 0..1$"
    )
    launcher.wait_for(r"^\[launch\] stopping the others$")
    assert launcher.count(r"starting agent-") == 0


@pytest.mark.parametrize("holder", ["another launcher", "another program"])
def test_a_port_in_use_is_never_reported_as_serving(services: Services, tmp_path: Path, holder: str) -> None:
    # A plain TCP connect to storage's port would find the other one there and call it serving.
    config = write_config(tmp_path, STORAGE_AND_AGENT_3)
    port = port_of(config, "storage")
    with socket.socket() as squatter:
        if holder == "another program":
            squatter.bind(("127.0.0.1", port))
            squatter.listen()
        else:
            first = launch(services, config)
            first.wait_for(r"^\[launch\] all 2 services are serving", timeout=STARTUP_TIMEOUT_S)
        second = launch(services, config)
        assert second.wait_exit(STARTUP_TIMEOUT_S) == 1, second.output
    second.wait_for(
        rf"^\[launch\] storage exited with code 1 before serving: port {port} on localhost \(127\.0\.0\.1\)"
        r" is already in use; is another \./run\.sh running\?$"
    )
    assert second.count(r"all \d services are serving|starting agent-3") == 0, second.output
    if holder == "another launcher":
        assert first.popen.poll() is None, first.output
