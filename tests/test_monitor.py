"""The monitor against a live system: its snapshot, its live view, a service down and back."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest
from helpers import STARTUP_TIMEOUT_S, Process, Services, write_config

# Agents and the agents each supervisor subscribes to, as in service_config.json.
SUPERVISED = {"supervisor-1": ("agent-1", "agent-2"), "supervisor-2": ("agent-3",)}
MAX_STORAGE = 500
# A generous bound on the propagation latency: it is a few ms on a quiet machine.
MAX_LATENCY_MS = 1000.0
# --once takes up to about 4 s; more allows for a busy machine.
ONCE_EXIT_S = 15.0


def snapshot(services: Services, config: Path) -> dict[str, list[str]]:
    """Runs ``monitor.py --once``; returns its rows by service: state, then the figures."""
    once = services.tool("monitor", "--service-config", str(config), "--once", label="monitor --once")
    assert once.wait_exit(ONCE_EXIT_S) == 0, once.output
    assert "Traceback" not in once.output, once.output
    rows = {}
    for line in once.lines:
        # Columns are two spaces apart or more; a cell holds single spaces at most.
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) > 1 and re.match(r"^(agent|supervisor|storage)-?\d*$", cells[0]) and cells[1] in ("up", "down"):
            rows[cells[0]] = cells[1:]
    return rows


def configured_rate(cell: str) -> float:
    """``5 Hz x 10`` -> 50."""
    match = re.fullmatch(r"(\S+) Hz x (\d+)", cell)
    assert match, cell
    return float(match.group(1)) * int(match.group(2))


def assert_near(value: str, expected: float, what: str) -> None:
    assert abs(float(value) - expected) <= 0.2 * expected, f"{what}: {value}/s, configured {expected}/s"


def assert_agent_row(name: str, cells: list[str]) -> float:
    """Checks an agent's row; returns its configured samples/s."""
    state, configured, achieved, remainder, paused, latency = cells
    assert state == "up", cells
    expected = configured_rate(configured)
    assert_near(achieved, expected, name)
    assert 0 <= int(remainder) <= MAX_STORAGE, cells
    assert paused == "no", cells
    match = re.fullmatch(r"(\S+)/(\S+) ms", latency)
    assert match, f"{name} shows no latency: {cells}"
    p50, p99 = float(match.group(1)), float(match.group(2))
    assert 0 < p50 <= p99 < MAX_LATENCY_MS, cells
    return expected


def assert_supervisor_row(name: str, cells: list[str], expected_received: float) -> None:
    state, received, stored, *failures = cells
    assert state == "up", cells
    assert_near(received, expected_received, name)
    assert 0 < float(stored) <= float(received), cells
    assert all(int(count) >= 0 for count in failures), cells


def assert_storage_row(cells: list[str]) -> None:
    state, fill, stores, drains, refused = cells
    assert state == "up", cells
    match = re.fullmatch(r"\[[#.]{20}\] (\d+)/(\d+)", fill)
    assert match, cells
    assert 0 <= int(match.group(1)) <= int(match.group(2)) == MAX_STORAGE, cells
    assert float(stores) > 0, cells
    assert float(drains) >= 0, cells
    assert int(refused) >= 0, cells


def assert_all_up_and_plausible(rows: dict[str, list[str]]) -> None:
    assert set(rows) == {"agent-1", "agent-2", "agent-3", "supervisor-1", "supervisor-2", "storage"}, rows
    configured = {name: assert_agent_row(name, rows[name]) for name in ("agent-1", "agent-2", "agent-3")}
    for supervisor, agents in SUPERVISED.items():
        assert_supervisor_row(supervisor, rows[supervisor], sum(configured[agent] for agent in agents))
    assert_storage_row(rows["storage"])


def start_together(services: Services, config: Path, names: list[str]) -> dict[str, Process]:
    """Starts services at once, then waits until each serves."""
    started = {name: services.service(config, name, wait=False) for name in names}
    for name, process in started.items():
        process.wait_for(rf"^{re.escape(name)} serving on ", STARTUP_TIMEOUT_S)
    return started


def wait_row(monitor: Process, name: str, state: str) -> None:
    """Waits for the live monitor to print a row of ``name`` in ``state`` from now on."""
    figures = r"\s+\S+ Hz x \d+\s+\d" if state == "up" and name.startswith("agent") else ""
    monitor.wait_for(rf"^{re.escape(name)}\s+{state}{figures}", timeout=10, start=len(monitor.lines))


# Many processes busy at once: never beside another such test (xdist group).
@pytest.mark.xdist_group("cpu")
def test_monitor_shows_every_service_and_who_is_down(services: Services, tmp_path: Path) -> None:
    config = write_config(tmp_path)
    # Started first: the services come up while it watches. Its stdout is a pipe, so it
    # prints a plain snapshot every second.
    live = services.tool("monitor", "--service-config", str(config), label="monitor")
    live.wait_for(r"^storage\s+down\s+-", timeout=10)
    # Supervisors last: they reach their agents at once, so that the rates they show
    # do not include a second of reconnecting to an agent that was not up yet.
    running = start_together(services, config, ["storage", "agent-1", "agent-2", "agent-3"])
    running.update(start_together(services, config, ["supervisor-1", "supervisor-2"]))

    assert_all_up_and_plausible(snapshot(services, config))
    wait_row(live, "storage", "up")

    # SIGKILL, as tests/test_recovery.py does, so that the port is free again at once.
    running["agent-2"].popen.kill()
    running["agent-2"].wait_exit(5)
    rows = snapshot(services, config)
    assert rows["agent-2"] == ["down"] + ["-"] * 5, rows["agent-2"]
    for name in ("agent-1", "agent-3", "supervisor-1", "supervisor-2", "storage"):
        assert rows[name][0] == "up", (name, rows[name])
    assert_agent_row("agent-3", rows["agent-3"])
    wait_row(live, "agent-2", "down")

    # Back again: the live monitor carries on and shows its figures.
    running["agent-2"] = services.service(config, "agent-2")
    wait_row(live, "agent-2", "up")
    live.signal(signal.SIGINT)
    assert live.wait_exit(5) == 0, live.output
    assert "Traceback" not in live.output


def test_monitor_reports_a_bad_config(services: Services, tmp_path: Path) -> None:
    monitor = services.tool("monitor", "--service-config", str(tmp_path / "missing.json"), "--once")
    assert monitor.wait_exit(10) == 1
    assert monitor.lines == [f"error: config file {tmp_path / 'missing.json'} does not exist"]
