"""Monitor: a live view of every service of a config, from the ``/stats`` each publishes once a second.

    python -m tools.monitor --service-config service_config.json          # live, in the terminal
    python -m tools.monitor --service-config service_config.json --once   # one plain-text snapshot

What it shows and what each column means: the README's "The monitor" (and ? in the live view).
Without a terminal it prints a plain-text snapshot every second.
"""

from __future__ import annotations

import propagation.startup  # noqa: F401  (first: before gRPC and farm-ng-core load)

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import math
import os
import signal
import sys
import termios
import time
import tty
from collections import deque
from typing import Any, Callable, Iterator, Sequence

from farm_ng.core.event_service_pb2 import SubscribeRequest
from farm_ng.core.uri_pb2 import Uri
from google.protobuf.struct_pb2 import ListValue, Struct
from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

from propagation.cli import run_cli
from propagation.config import Entry, check, check_endpoint, read_config, role_of
from propagation.peers import PeerClient
from tools.figures import INVALID, NONE, number, sent_at, shown

# A service that sent no /stats for this long is down: it publishes every second, so one may be late.
DOWN_AFTER_S = 2.5
# Rates span about this long: long enough to smooth out a fill and drain cycle, short enough to follow a change.
RATE_WINDOW_S = 3.0
# Counts show their growth over this long: a total that stopped growing long ago (unsent 2) reads as +0.
RECENT_S = 60.0
REFRESH_S = 0.5
# --once waits for this many /stats of each service (two intervals for the rates), at most ONCE_TIMEOUT_S.
ONCE_STATS = 3
ONCE_TIMEOUT_S = 4.0
FILL_BAR_WIDTH = 20
# Counters that only grow while a service runs: one that fell means the service restarted.
RATE_COUNTERS = ("published", "received", "stored", "accepted", "drained")


@dataclasses.dataclass(frozen=True)
class Stats:
    """One ``/stats`` of a service: its figures, its number and when it was sent."""

    sequence: int
    sent: float  # the service's monotonic clock, seconds
    figures: dict[str, Any]


class ServiceView:
    """What the monitor knows about one service: its ``/stats`` of the last minute, and its restarts."""

    def __init__(self, entry: Entry) -> None:
        self.entry = entry
        self.name = entry.name
        self.role = role_of(entry)
        self.history: deque[Stats] = deque()
        self.heard: float | None = None  # the monitor's monotonic clock
        self.heard_at: float | None = None  # the same moment on the wall clock, to show
        self.received = 0
        self.restarted = ""  # its last restart, for the summary: ``at 20:26:09 after 4 s down``

    def add(self, stats: Stats, now: float) -> None:
        """Keeps one ``/stats``; a service that restarted starts a new history."""
        silent_for = 0.0 if self.heard is None else now - self.heard
        self.heard, self.heard_at = now, time.time()
        self.received += 1
        if self.history:
            last = self.history[-1]
            if stats.sequence == last.sequence:
                return  # the latched one again, after a reconnect
            # A counter that fell: it started over (its first /stats may be missed while reconnecting).
            fell = any((number(stats.figures, key) or 0) < (number(last.figures, key) or 0) for key in RATE_COUNTERS)
            if stats.sequence < last.sequence or fell:
                self.history.clear()
                self.restarted = f"at {clock(self.heard_at)} after {duration(silent_for)} down"
        self.history.append(stats)
        while self.history[0].sent < stats.sent - RECENT_S:
            self.history.popleft()

    def is_up(self, now: float) -> bool:
        """Whether a ``/stats`` arrived within the last ``DOWN_AFTER_S``."""
        return self.heard is not None and now - self.heard < DOWN_AFTER_S

    def down_for(self, now: float) -> str:
        """``down for 12 s, last seen 20:26:05``, or ``down, never seen``."""
        if self.heard is None or self.heard_at is None:
            return "down, never seen"
        return f"down for {duration(now - self.heard)}, last seen {clock(self.heard_at)}"

    @property
    def figures(self) -> dict[str, Any]:
        """The latest figures; empty before the first ``/stats``."""
        return self.history[-1].figures if self.history else {}

    def growth(self, counter: str, window_s: float) -> tuple[float, float] | None:
        """How much a counter grew over the last ``window_s`` (or as long as heard), and over how long."""
        if len(self.history) < 2 or counter not in self.figures:
            return None
        last = self.history[-1]
        first = next(stats for stats in self.history if stats.sent >= last.sent - window_s)
        return (number(last.figures, counter) or 0.0) - (number(first.figures, counter) or 0.0), last.sent - first.sent

    def rate(self, counter: str) -> float | None:
        """How fast a counter grew over the last ``RATE_WINDOW_S``, per second; None before two ``/stats``."""
        grown = self.growth(counter, RATE_WINDOW_S)
        return None if grown is None or grown[1] <= 0 else grown[0] / grown[1]


def duration(seconds: float) -> str:
    """``12 s``, ``3 min 5 s`` or ``2 h 10 min``."""
    whole_s = int(seconds)
    if whole_s < 120:
        return f"{whole_s} s"
    if whole_s < 2 * 3600:
        return f"{whole_s // 60} min {whole_s % 60} s"
    return f"{whole_s // 3600} h {whole_s % 3600 // 60} min"


def clock(wall: float) -> str:
    """``20:26:05``, local time."""
    return time.strftime("%H:%M:%S", time.localtime(wall))


def views_of(config_path: str) -> list[ServiceView]:
    """A view for every service of the config; ConfigError if it is bad or has no service of this example."""
    views = [ServiceView(entry) for entry in read_config(config_path) if role_of(entry) is not None]
    for view in views:
        check_endpoint(view.entry)
    check(views != [], f"{config_path} has no storage, supervisor or agent entry with a port")
    return views


async def listen(view: ServiceView) -> None:
    """Follows one service's ``/stats`` until cancelled, across its restarts."""
    client = PeerClient(view.entry.service_config(), "monitor")
    request = SubscribeRequest(uri=Uri(path="/stats", query=f"service_name={view.name}"), every_n=1)
    try:
        async for event, message in client.subscribe(request, decode=True):
            if isinstance(message, Struct):
                # A latched /stats may be a second old: its send stamp, not its arrival, says when it was true.
                view.add(Stats(event.sequence, sent_at(event) or time.monotonic(), dict(message)), time.monotonic())
    finally:
        await client.close()


@dataclasses.dataclass(frozen=True)
class Look:
    """How the tables are drawn: for a terminal, or as plain text."""

    rule: str  # under each table's header; empty for none
    bar_full: str
    bar_empty: str
    keys: str  # the keys, for the legend; empty for none


LIVE = Look("─", "█", "░", "? explains the columns; q or Ctrl-C quits")
PLAIN = Look("", "#", ".", "")
GAP = "  "  # between columns


@dataclasses.dataclass(frozen=True)
class Column:
    """One column of a table: its heading, what it means, and its cell for a service that is up."""

    heading: str
    means: str
    cell: Callable[[ServiceView, Look], str]
    optional: str = ""  # a /stats figure: shown only if a service of the table carries it
    left: bool = False  # aligned left (words), else right (figures)


def legend(views: list[ServiceView], look: Look) -> str:
    """What the figures mean, in one line."""
    # Growth over the last minute; a monitor that started a moment ago saw less of it.
    watched = max((view.history[-1].sent - view.history[0].sent for view in views if view.history), default=0.0)
    rates = f"the {watched:.0f} s watched" if 0 < watched < RATE_WINDOW_S else f"the last {RATE_WINDOW_S:g} s"
    lately = f"the {watched:.0f} s watched" if 0 < watched < RECENT_S - DOWN_AFTER_S else "the last minute"
    parts = [f"x/s: over {rates}", f"counts: since the service started, (+n) over {lately}", look.keys]
    return "; ".join(part for part in parts if part)


def render(views: list[ServiceView], look: Look, now: float, width: int | None = None, explain: bool = False) -> Group:
    """The whole view: a summary line, the legend, then the tables of agents, supervisors and storage."""
    down = [view.name for view in views if not view.is_up(now)]
    restarts = [f"{view.name} {view.restarted}" for view in views if view.restarted]
    summary = f"{time.strftime('%H:%M:%S')}  {len(views)} services, {len(views) - len(down)} up"
    summary += f", down: {', '.join(down)}" if down else ""
    summary += f"; restarted: {', '.join(restarts)}" if restarts else ""
    parts: list[Text] = [Text(summary), Text(legend(views, look), style="dim")]
    if explain:  # in place of the tables: a terminal may not hold both
        parts.append(Text("\nWhat each column means (? again shows the tables):"))
        parts += [
            Text(f"  {role:<10} {column.heading:<15} {column.means}")
            for role, columns in TABLES.items()
            for column in columns
        ]
        return Group(*parts)
    for role in TABLES:
        members = [view for view in views if view.role == role]
        if members:
            parts += [Text(""), *table(members, role, look, now, width)]
    return Group(*parts)


def table(members: list[ServiceView], role: str, look: Look, now: float, width: int | None) -> list[Text]:
    """The table of one role's services, and a line naming the columns that would make it wider than ``width``.

    A service that is down gets one line, which says since when, in place of its figures.
    """
    up = [view for view in members if view.is_up(now)]
    columns = [
        column for column in TABLES[role] if not column.optional or any(column.optional in view.figures for view in up)
    ]
    header = [role, "state", *(column.heading for column in columns)]
    lefts = [True, True, *(column.left for column in columns)]
    rows = {view.name: [view.name, "up", *(column.cell(view, look) for column in columns)] for view in up}
    widths = [max(len(cells[index]) for cells in [header, *rows.values()]) for index in range(len(header))]
    widths[0] = max(widths[0], *(len(view.name) for view in members))
    hidden: list[str] = []
    while width is not None and len(widths) > 2 and sum(widths) + len(GAP) * (len(widths) - 1) > width:
        hidden.insert(0, header.pop())
        widths.pop()
    lines = Text(no_wrap=True, overflow="crop")
    lines.append(aligned(header, widths, lefts), style="bold" if look.rule else "")
    if look.rule:
        lines.append("\n" + look.rule * (sum(widths) + len(GAP) * (len(widths) - 1)))
    for view in members:
        lines.append("\n" + view.name.ljust(widths[0]) + GAP)
        cells = rows.get(view.name)
        if cells is None:
            lines.append(view.down_for(now), style="bold red")
        else:
            lines.append("up".ljust(widths[1]), style="green")
            lines.append(GAP + aligned(cells[2:], widths[2:], lefts[2:]))
    if not hidden:
        return [lines]
    return [lines, Text(f"(not shown: {', '.join(hidden)}; a wider terminal shows them)", style="dim")]


def aligned(cells: Sequence[str], widths: Sequence[int], lefts: Sequence[bool]) -> str:
    """Cells of one line as far as ``widths`` go, two spaces apart: words aligned left, figures right."""
    return GAP.join(cell.ljust(width) if left else cell.rjust(width) for cell, width, left in zip(cells, widths, lefts))


def per_second(counter: str) -> Callable[[ServiceView, Look], str]:
    """The cell of a rate: ``50.0`` per second, ``-`` while unknown."""
    return lambda view, _: shown(view.rate(counter), "{:.1f}")


def count(counter: str) -> Callable[[ServiceView, Look], str]:
    """The cell of a count: ``2 (+0)``, the total since the service started and its growth lately."""

    def cell(view: ServiceView, _: Look) -> str:
        total = number(view.figures, counter)
        if total is None:
            return NONE
        grown = view.growth(counter, RECENT_S)
        return f"{shown(total)} (+{shown(None if grown is None else grown[0])})"

    return cell


def formatted(template: str, form: str, *keys: str) -> Callable[[ServiceView, Look], str]:
    """The cell of figures shown in ``form`` each, in ``template``: ``5 Hz x 10``; ``-`` while one is unknown."""

    def cell(view: ServiceView, _: Look) -> str:
        values = [number(view.figures, key) for key in keys]
        return NONE if None in values else template.format(*(shown(value, form) for value in values))

    return cell


def paused(view: ServiceView, _: Look) -> str:
    """``yes`` or ``no``."""
    flag = view.figures.get("paused")
    if flag is None:
        return NONE
    return ("yes" if flag else "no") if isinstance(flag, bool) else INVALID


def agents(view: ServiceView, _: Look) -> str:
    """The agents a supervisor serves, as its ``/stats`` names them."""
    names = view.figures.get("agents")
    if names is None:
        return NONE
    if not isinstance(names, ListValue) or not all(isinstance(name, str) for name in names):
        return INVALID
    return ", ".join(names) or NONE


def fill(view: ServiceView, look: Look) -> str:
    """``[#####...............] 19/40``."""
    items, limit = number(view.figures, "count"), number(view.figures, "max_storage")
    if items is None or limit is None:
        return NONE
    if not (math.isfinite(items) and math.isfinite(limit)) or limit <= 0:
        return f"{shown(items)}/{shown(limit)} {INVALID}"
    full = round(FILL_BAR_WIDTH * min(max(items / limit, 0.0), 1.0))
    return f"[{look.bar_full * full}{look.bar_empty * (FILL_BAR_WIDTH - full)}] {items:.0f}/{limit:.0f}"


TABLES: dict[str, tuple[Column, ...]] = {
    "agent": (
        Column("configured", "rate x num_tasks, from its args", formatted("{} Hz x {}", "{:g}", "rate", "num_tasks")),
        Column("samples/s", "samples it published per second", per_second("published")),
        Column(
            "remainder",
            "the room left in storage it last heard of (- before the first)",
            formatted("{}", "{:.0f}", "remainder"),
        ),
        Column("paused", "whether it waits for room in storage (remainder 0 or less)", paused),
        Column("pauses", "how often it paused", count("pauses")),
        Column(
            "latency p50/p99",
            "sample published -> residual back at the agent, over its last 5 s",
            formatted("{}/{} ms", "{:.1f}", "latency_p50_ms", "latency_p99_ms"),
        ),
    ),
    "supervisor": (
        Column("agents", "the agents whose samples it relays", agents, left=True),
        Column("received/s", "samples received from its agents per second", per_second("received")),
        Column("stored/s", "samples storage took per second", per_second("stored")),
        Column("refused", "stores storage refused: it was full", count("refused")),
        Column(
            "not stored", "stores that failed: storage down, slow or answering off the contract", count("not_stored")
        ),
        Column(
            "unconfirmed",
            "stores whose call failed after storage may have taken them",
            count("unconfirmed"),
            "unconfirmed",
        ),
        Column("dropped", "samples dropped unrelayed: more came than it could store in time", count("dropped")),
        Column("unsent", "residuals it could not deliver to an agent (down or not up yet)", count("unsent")),
        Column("wakeups", "residuals sent to paused agents when storage made room", count("wakeups"), "wakeups"),
    ),
    "storage": (
        Column("fill", "items held / max_storage", fill, left=True),
        Column("stores/s", "items stored per second", per_second("accepted")),
        Column("drains/s", "items drained per second", per_second("drained")),
        Column("refused", "stores refused because it was full", count("refused")),
    ),
}


def plain_text(views: list[ServiceView], now: float) -> str:
    """The view as plain text: no colours, no trailing blanks."""
    console = Console(width=200, no_color=True, highlight=False, force_terminal=False)
    with console.capture() as capture:
        console.print(render(views, PLAIN, now))
    return "\n".join(line.rstrip() for line in capture.get().splitlines())


async def monitor(views: list[ServiceView], once: bool) -> None:
    """Listens to every service and shows what it hears until Ctrl-C (or once)."""
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    listeners = [asyncio.ensure_future(listen(view)) for view in views]
    try:
        if once:
            # Until each service sent ONCE_STATS /stats, or was never heard from in DOWN_AFTER_S.
            started = time.monotonic()
            while not stop.is_set() and (elapsed := time.monotonic() - started) < ONCE_TIMEOUT_S:
                silent = elapsed >= DOWN_AFTER_S  # long enough to say that a service never heard from is down
                if all(view.received >= ONCE_STATS or (silent and view.received == 0) for view in views):
                    break
                await wait_or_stop(stop, 0.1)
            print(plain_text(views, time.monotonic()), flush=True)
        elif sys.stdout.isatty():  # redrawn in place, as wide as the terminal
            explain = [False]
            with keys(stop, explain), Live(auto_refresh=False) as live:
                while not stop.is_set():
                    live.update(render(views, LIVE, time.monotonic(), live.console.width, explain[0]), refresh=True)
                    await wait_or_stop(stop, REFRESH_S)
        else:  # a snapshot every second, a blank line between them
            while not stop.is_set():
                await wait_or_stop(stop, 1.0)
                print(plain_text(views, time.monotonic()) + "\n", flush=True)
    finally:
        for listener in listeners:
            listener.cancel()
        await asyncio.gather(*listeners, return_exceptions=True)


@contextlib.contextmanager
def keys(stop: asyncio.Event, explain: list[bool]) -> Iterator[None]:
    """Sets ``stop`` on q and toggles ``explain[0]`` on ? typed in the terminal; puts the terminal back after.

    In cbreak mode each key comes at once, unechoed, and Ctrl-C still sends SIGINT; the event loop reads
    keys as they come, so the view never waits for one. Without a terminal on stdin, only Ctrl-C quits.
    """
    if not sys.stdin.isatty():
        yield
        return
    fd = sys.stdin.fileno()
    loop = asyncio.get_running_loop()
    saved = termios.tcgetattr(fd)

    def read_keys() -> None:
        try:
            typed = os.read(fd, 64)
        except OSError:
            typed = b""
        if not typed:  # the terminal is gone: stop reading it
            loop.remove_reader(fd)
        if b"q" in typed.lower():
            stop.set()
        if b"?" in typed:
            explain[0] = not explain[0]

    try:
        tty.setcbreak(fd)
        loop.add_reader(fd, read_keys)
        yield
    finally:
        loop.remove_reader(fd)
        # TCSADRAIN: after what the view wrote, so the last frame is not mangled.
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


async def wait_or_stop(stop: asyncio.Event, seconds: float) -> None:
    """Waits ``seconds``, or less if ``stop`` is set meanwhile."""
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="python -m tools.monitor", description="A live view of the services of a config."
    )
    parser.add_argument("--service-config", default="service_config.json", help="the config whose services to watch")
    parser.add_argument("--once", action="store_true", help="print one plain-text snapshot and exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parses the command line and runs the monitor; returns the exit code."""
    cli = build_parser().parse_args(argv)
    # The tables say who is down; PeerClient's lines about it would scroll the view.
    logging.disable(logging.WARNING)
    return run_cli(lambda: asyncio.run(monitor(views_of(cli.service_config), cli.once)))


if __name__ == "__main__":
    sys.exit(main())
