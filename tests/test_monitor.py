"""The monitor against a live system: its snapshot, its live view, a service down and back, q."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import pytest
from fakes import publishing_stats
from helpers import ROOT, STARTUP_TIMEOUT_S, WAIT_TIMEOUT_S, Process, Services, write_config

from tools import monitor

# Agents and the agents each supervisor subscribes to, as in service_config.json.
SUPERVISED = {"supervisor-1": ("agent-1", "agent-2"), "supervisor-2": ("agent-3",)}
MAX_STORAGE = 500
# The counts of a supervisor's row, as many as its /stats carries of these.
FAILURES = ("refused", "not stored", "unconfirmed", "dropped", "unsent", "wakeups")
# A generous bound on the propagation latency: it is a few ms on a quiet machine.
MAX_LATENCY_MS = 1000.0
# --once takes up to about 4 s; more allows for a busy machine.
ONCE_EXIT_S = WAIT_TIMEOUT_S


LEGEND = re.compile(
    r"^x/s: over the (last 3 s|\d s watched); counts: since the service started,"
    r" \(\+n\) over the (last minute|\d+ s watched)$"
)
# A count: its total since the service started and how much it grew over the last minute.
COUNT = re.compile(r"^(\d+) \(\+(\d+)\)$")
DOWN_SINCE = r"down for \d+ s, last seen \d\d:\d\d:\d\d"


def snapshot(services: Services, config: Path) -> dict[str, list[str]]:
    """Runs ``monitor.py --once``; returns its rows by service: state, then the figures."""
    once = services.tool("monitor", "--service-config", str(config), "--once", label="monitor --once")
    assert once.wait_exit(ONCE_EXIT_S) == 0, once.output
    assert "Traceback" not in once.output, once.output
    assert LEGEND.match(once.lines[1]), once.output
    rows = {}
    for line in once.lines:
        # Columns are two spaces apart or more; a cell holds single spaces at most.
        cells = re.split(r"\s{2,}", line.strip())
        # A service's row: its name, then "up" or "down ..."; a table's header: its role, then "state".
        if len(cells) > 1 and re.match(r"^(agent|supervisor|storage)-?\d*$", cells[0]):
            rows[cells[0]] = cells[1:]
    return rows


def assert_count(cell: str) -> int:
    """Checks a count cell (``2 (+0)``): it grew lately by no more than its total; returns the total."""
    match = COUNT.match(cell)
    assert match, cell
    total, lately = int(match.group(1)), int(match.group(2))
    assert lately <= total, cell
    return total


def configured_rate(cell: str) -> float:
    """``5 Hz x 10`` -> 50."""
    match = re.fullmatch(r"(\S+) Hz x (\d+)", cell)
    assert match, cell
    return float(match.group(1)) * int(match.group(2))


def assert_near(value: str, expected: float, what: str) -> None:
    """A rate the monitor shows is of the order of the rate configured.

    How closely agents keep their rate is a figure of tools/bench.py, and the monitor's
    arithmetic has a test of its own. On a loaded machine an agent skips the slots it
    missed, and a supervisor that fell behind receives a backlog at once (134/s of a
    100/s agent was seen at load 16): the bounds catch a wrong unit, not a slow machine.
    """
    assert expected / 4 <= float(value) <= 4 * expected, f"{what}: {value}/s, configured {expected}/s"


def assert_agent_row(name: str, cells: list[str]) -> float:
    """Checks an agent's row; returns its configured samples/s."""
    state, configured, achieved, remainder, paused, pauses, latency = cells
    assert state == "up", cells
    expected = configured_rate(configured)
    assert_near(achieved, expected, name)
    assert 0 <= int(remainder) <= MAX_STORAGE, cells
    assert paused == "no", cells
    assert_count(pauses)
    match = re.fullmatch(r"(\S+)/(\S+) ms", latency)
    assert match, f"{name} shows no latency: {cells}"
    p50, p99 = float(match.group(1)), float(match.group(2))
    assert 0 < p50 <= p99 < MAX_LATENCY_MS, cells
    return expected


def assert_supervisor_row(name: str, cells: list[str], expected_received: float) -> None:
    state, agents, received, stored, *failures = cells
    assert state == "up", cells
    assert agents == ", ".join(SUPERVISED[name]), cells  # what it says it serves, in its /stats
    assert_near(received, expected_received, name)
    assert 0 < float(stored) <= float(received), cells
    assert len(failures) >= 4, cells  # refused, not stored, dropped, unsent at least
    for cell in failures:
        assert_count(cell)


def assert_storage_row(cells: list[str]) -> None:
    state, fill, stores, drains, refused = cells
    assert state == "up", cells
    match = re.fullmatch(r"\[[#.]{20}\] (\d+)/(\d+)", fill)
    assert match, cells
    assert 0 <= int(match.group(1)) <= int(match.group(2)) == MAX_STORAGE, cells
    assert float(stores) > 0, cells
    # Over a window of 2 s or more it cannot drain more than it stored and held before.
    assert 0 <= float(drains) <= float(stores) + MAX_STORAGE / 2, cells
    assert_count(refused)


def assert_all_up_and_plausible(rows: dict[str, list[str]]) -> None:
    services = {"agent-1", "agent-2", "agent-3", "supervisor-1", "supervisor-2", "storage"}
    assert set(rows) == {"agent", "supervisor", *services}, rows
    counts = rows["supervisor"][4:]  # after state, agents, received/s, stored/s
    assert counts == [heading for heading in FAILURES if heading in counts], rows["supervisor"]
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
    """Waits for the live monitor to print a row of ``name`` in ``state`` (a pattern) from now on."""
    figures = r"\s+\S+ Hz x \d+\s+\d" if state == "up" and name.startswith("agent") else ""
    monitor.wait_for(rf"^{re.escape(name)}\s+{state}{figures}", timeout=WAIT_TIMEOUT_S, start=len(monitor.lines))


# Many processes busy at once: never beside another such test (xdist group).
@pytest.mark.xdist_group("cpu")
def test_monitor_shows_every_service_and_who_is_down(services: Services, tmp_path: Path) -> None:
    config = write_config(tmp_path)
    # Started first: the services come up while it watches. Its stdout is a pipe, so it
    # prints a plain snapshot every second.
    live = services.tool("monitor", "--service-config", str(config), label="monitor")
    live.wait_for(r"^storage\s+down, never seen$", timeout=WAIT_TIMEOUT_S)
    assert any(LEGEND.match(line) for line in live.lines), live.output
    # Supervisors last: they reach their agents at once, so that the rates they show
    # do not include a second of reconnecting to an agent that was not up yet.
    running = start_together(services, config, ["storage", "agent-1", "agent-2", "agent-3"])
    running.update(start_together(services, config, ["supervisor-1", "supervisor-2"]))

    assert_all_up_and_plausible(snapshot(services, config))
    wait_row(live, "storage", "up")

    # SIGKILL, as tests/test_recovery.py does, so that the port is free again at once.
    running["agent-2"].popen.kill()
    running["agent-2"].wait_exit(5)
    # A monitor that starts now never saw it; the one that watched says since when.
    rows = snapshot(services, config)
    assert rows["agent-2"] == ["down, never seen"], rows["agent-2"]
    for name in ("agent-1", "agent-3", "supervisor-1", "supervisor-2", "storage"):
        assert rows[name][0] == "up", (name, rows[name])
    assert_agent_row("agent-3", rows["agent-3"])
    wait_row(live, "agent-2", f"{DOWN_SINCE}$")

    # Back again: the live monitor carries on and shows its figures.
    running["agent-2"] = services.service(config, "agent-2")
    wait_row(live, "agent-2", "up")
    # The summary says it restarted, and after how long a gap.
    live.wait_for(r"; restarted: agent-2 at \d\d:\d\d:\d\d after \d+ s down$", start=len(live.lines) - 40)
    live.signal(signal.SIGINT)
    assert live.wait_exit(5) == 0, live.output
    assert "Traceback" not in live.output


def cell(view: monitor.ServiceView, heading: str) -> str:
    """What the monitor shows in column ``heading`` of a service that is up."""
    column = next(column for column in monitor.TABLES[view.role] if column.heading == heading)
    return column.cell(view, monitor.PLAIN)


def test_counts_show_the_last_minute_beside_the_total(tmp_path: Path) -> None:
    views = monitor.views_of(str(write_config(tmp_path)))
    view = next(view for view in views if view.name == "supervisor-1")
    assert view.down_for(now=100.0) == "down, never seen"
    # Two unsent at the start, none for the next 70 s: a total of 2, none lately.
    for second in range(71):
        figures = {"unsent": 2, "refused": second // 10, "received": 100 * second}
        view.add(monitor.Stats(sequence=second, sent=1000.0 + second, figures=figures), now=second)
    assert cell(view, "unsent") == "2 (+0)"
    assert cell(view, "refused") == "7 (+6)"  # one every 10 s
    assert cell(view, "received/s") == "100.0"
    assert cell(view, "not stored") == "-"  # a figure its /stats does not carry
    assert view.down_for(now=82.4).startswith("down for 12 s, last seen ")
    assert "(+n) over the last minute" in monitor.legend(views, monitor.PLAIN)


def test_a_count_never_shows_more_lately_than_in_all(tmp_path: Path) -> None:
    # 531 in the 19 s watched: +531, not 1675 "a minute"; 100 of them came before it watched.
    views = monitor.views_of(str(write_config(tmp_path)))
    view = next(view for view in views if view.name == "supervisor-1")
    for second in range(20):
        figures = {"not_stored": 100 + round(431 * second / 19)}
        view.add(monitor.Stats(sequence=second, sent=1000.0 + second, figures=figures), now=second)
    assert cell(view, "not stored") == "531 (+431)"
    assert "(+n) over the 19 s watched" in monitor.legend(views, monitor.PLAIN)


def test_monitor_reports_a_bad_config(services: Services, tmp_path: Path) -> None:
    monitor = services.tool("monitor", "--service-config", str(tmp_path / "missing.json"), "--once")
    assert monitor.wait_exit(WAIT_TIMEOUT_S) == 1
    assert monitor.lines == [f"error: config file {tmp_path / 'missing.json'} does not exist"]


class TerminalProcess:
    """A process whose stdin, stdout and stderr are a terminal (a pty), as a person runs it.

    Duck-typed like ``helpers.Process`` for the ``services`` fixture, which stops it.
    """

    def __init__(self, label: str, argv: list[str], columns: int = 160) -> None:
        self.label = label
        self.lines: list[str] = []
        self.master, self.terminal = pty.openpty()
        # 40 rows of 160 columns: wide and tall enough for every table.
        fcntl.ioctl(self.terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
        self.settings = termios.tcgetattr(self.terminal)
        self._output = b""
        self._lock = threading.Lock()
        self._done = threading.Event()
        # Its size is the terminal's, as for a person: not COLUMNS or LINES a test runner may set.
        env = {key: value for key, value in os.environ.items() if key not in ("COLUMNS", "LINES")}
        env.update(TERM="xterm-256color", PYTHONUNBUFFERED="1")
        self.popen = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdin=self.terminal, stdout=self.terminal, stderr=self.terminal
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while not self._done.is_set():
            ready, _, _ = select.select([self.master], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(self.master, 65536)
                except OSError:
                    return
                with self._lock:
                    self._output += chunk
                    self.lines = self._output.decode(errors="replace").splitlines()

    def wait_for_text(self, text: str, timeout: float) -> None:
        """Waits until the terminal shows ``text``; fails with what it shows otherwise."""
        deadline = time.monotonic() + timeout
        while text.encode() not in self._output:
            if self.popen.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"{self.label} did not show {text!r} within {timeout} s:\n{self._output[-3000:]!r}")
            time.sleep(0.05)  # readiness-free: polls the terminal's output, bounded by the deadline

    def type(self, keys: bytes) -> None:
        """Types keys into the terminal."""
        os.write(self.master, keys)

    def signal(self, signum: int) -> None:
        """Sends a signal if it still runs."""
        if self.popen.poll() is None:
            self.popen.send_signal(signum)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL; then closes the terminal."""
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self._done.set()
        self._reader.join(5)
        for fd in (self.master, self.terminal):
            os.close(fd)


def test_live_view_in_a_terminal_quits_on_q_and_restores_the_terminal(services: Services, tmp_path: Path) -> None:
    config = write_config(tmp_path)  # nothing runs there: every service is down
    monitor = TerminalProcess(
        "monitor (terminal)", [sys.executable, "-m", "tools.monitor", "--service-config", str(config)]
    )
    services.started.append(monitor)  # type: ignore[arg-type]
    monitor.wait_for_text("q or Ctrl-C quits", timeout=STARTUP_TIMEOUT_S)
    monitor.wait_for_text("down, never seen", timeout=WAIT_TIMEOUT_S)
    # Keys come one at a time, unechoed: no Enter needed.
    assert not termios.tcgetattr(monitor.terminal)[3] & (termios.ICANON | termios.ECHO)
    monitor.type(b"q")
    try:
        assert monitor.popen.wait(10) == 0
    except subprocess.TimeoutExpired:
        pytest.fail(f"q did not stop the monitor:\n{monitor.lines[-20:]}")
    assert termios.tcgetattr(monitor.terminal) == monitor.settings


def test_a_narrow_terminal_names_the_columns_it_leaves_out_and_question_mark_explains(
    services: Services, tmp_path: Path
) -> None:
    config = write_config(tmp_path)  # nothing runs there: the headers alone are wider than 80
    argv = [sys.executable, "-m", "tools.monitor", "--service-config", str(config)]
    monitor = TerminalProcess("monitor (80 columns)", argv, columns=80)
    services.started.append(monitor)  # type: ignore[arg-type]
    monitor.wait_for_text("? explains the columns", timeout=STARTUP_TIMEOUT_S)
    monitor.wait_for_text("(not shown: latency p50/p99; a wider terminal shows them)", timeout=WAIT_TIMEOUT_S)
    monitor.wait_for_text("(not shown: unsent; a wider terminal shows them)", timeout=WAIT_TIMEOUT_S)
    monitor.type(b"?")
    monitor.wait_for_text("residuals it could not deliver to an agent", timeout=WAIT_TIMEOUT_S)
    monitor.wait_for_text("stores refused because it was full", timeout=WAIT_TIMEOUT_S)
    monitor.type(b"q")
    assert monitor.popen.wait(WAIT_TIMEOUT_S) == 0


# What a stranger can publish on /stats: not the numbers, lists and flags the services put there.
NAN, INF = float("nan"), float("inf")
MALFORMED = {
    "agent-1": {
        "rate": "fast",
        "num_tasks": NAN,
        "published": "many",
        "remainder": INF,
        "paused": "yes",
        "pauses": NAN,
        "latency_p50_ms": "1",
        "latency_p99_ms": INF,
    },
    "supervisor-1": {"agents": 3, "received": NAN, "stored": "s", "refused": INF, "not_stored": "x", "dropped": -INF},
    "storage": {"count": NAN, "max_storage": INF, "accepted": "a", "drained": NAN, "refused": "r"},
}


def test_malformed_figures_show_as_invalid(services: Services, tmp_path: Path) -> None:
    config = write_config(tmp_path)
    with publishing_stats(config, MALFORMED):
        rows = snapshot(services, config)
        live = services.tool("monitor", "--service-config", str(config), label="monitor")  # a snapshot a second
        live.wait_for(r"^storage\s+up\s+invalid", timeout=WAIT_TIMEOUT_S)
        live.signal(signal.SIGINT)
        assert live.wait_exit(WAIT_TIMEOUT_S) == 0, live.output
        assert "Traceback" not in live.output
    for name, figures in MALFORMED.items():
        state, *cells = rows[name]
        assert state == "up", rows[name]
        # unsent is not in the fake's /stats: "-", not invalid.
        assert all("invalid" in cell or cell == "-" for cell in cells), (name, cells)
        assert sum("invalid" in cell for cell in cells) >= len(figures) - 2, (name, cells)
