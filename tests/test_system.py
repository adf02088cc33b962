"""The walkthrough's system, end to end, and the launcher that starts it."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest
from helpers import WAIT_TIMEOUT_S, Services, stats, write_config


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
    launcher = services.tool("launch", "--service-config", str(config), label="launch")
    launcher.wait_for(r"^\[launch\] all 6 services are serving", timeout=60)
    launcher.wait_for(r"^\[storage\] Storage: \d+/500 \(\d+ remaining\)$")
    launcher.wait_for(r"^\[supervisor-1\] Residual: value: \d+$")
    launcher.wait_for(r"^\[agent-3\] Published sample 0\.\d+ from task 0$")
    starts = [m.group(1) for m in launcher.matches(r"^\[launch\] starting (\S+) \(pid \d+\): python ")]
    assert starts == ["storage", "supervisor-1", "supervisor-2", "agent-1", "agent-2", "agent-3"]
    launcher.signal(signal.SIGINT)
    assert launcher.wait_exit(15) == 0, launcher.output
    assert "Traceback" not in launcher.output
    launcher.wait_for(r"^\[launch\] stopped all 6 services$")


# Many processes busy at once: never beside another such test (xdist group).
@pytest.mark.xdist_group("cpu")
def test_launcher_reports_a_service_that_dies(services: Services, tmp_path: Path) -> None:
    config = write_config(tmp_path)
    launcher = services.tool("launch", "--service-config", str(config), label="launch")
    launcher.wait_for(r"^\[launch\] all 6 services are serving", timeout=60)
    pid = int(launcher.wait_for(r"^\[launch\] starting agent-2 \(pid (\d+)\)").group(1))
    os.kill(pid, signal.SIGKILL)
    assert launcher.wait_exit(15) == 1, launcher.output
    launcher.wait_for(r"^\[launch\] agent-2 was killed by SIGKILL; stopping the others$")


def test_launcher_exits_1_when_a_service_does_not_stop(services: Services, tmp_path: Path) -> None:
    config = write_config(tmp_path, {name: None for name in ("supervisor-1", "supervisor-2", "agent-1", "agent-2")})
    launcher = services.tool("launch", "--service-config", str(config), label="launch")
    launcher.wait_for(r"^\[launch\] all 2 services are serving", timeout=60)
    pid = int(launcher.wait_for(r"^\[launch\] starting agent-3 \(pid (\d+)\)").group(1))
    os.kill(pid, signal.SIGSTOP)  # deaf to SIGTERM until killed
    launcher.signal(signal.SIGINT)
    assert launcher.wait_exit(WAIT_TIMEOUT_S) == 1, launcher.output
    launcher.wait_for(r"^\[launch\] not stopped cleanly: agent-3 was killed by SIGKILL$")


def test_launcher_fails_when_a_service_cannot_start(services: Services, tmp_path: Path) -> None:
    config = write_config(tmp_path, {"supervisor-2": {"args": ["confidence=2"]}})
    launcher = services.tool("launch", "--service-config", str(config), label="launch")
    assert launcher.wait_exit(60) == 1, launcher.output
    launcher.wait_for(r"^\[supervisor-2\] error: service 'supervisor-2': arg confidence=2 must be in 0..1$")
    launcher.wait_for(r"^\[launch\] supervisor-2 exited with code 1 before serving; stopping the others$")
    assert launcher.count(r"starting agent-") == 0
