"""Monitor: a live view of every service of a config, from what they publish.

    python -m tools.monitor --service-config service_config.json          # live, in the terminal
    python -m tools.monitor --service-config service_config.json --once   # one plain-text snapshot

Each service publishes its counters on ``/stats`` (a latched ``Struct``) every second.
The monitor subscribes to them all and turns two ``/stats`` of a service into rates:
counters only grow, so a rate is the difference of two counters over the time between
them, by the service's own send stamps. Rates per second span the last ``RATE_WINDOW_S``;
a count shows its total since the service started and, beside it, how fast it grew over
the last minute (``unsent 2 (0/min)``: two in all, none lately). A service that sent no
``/stats`` for ``DOWN_AFTER_S`` shows as down, with how long ago and when the monitor
last heard from it (or "never seen"). The monitor may start before, after or without any
service, and keeps going while they stop and restart.

In a terminal, q or Ctrl-C quits: keys are read without waiting for Enter, and the
terminal is put back as it was on the way out. When stdout is not a terminal it prints
a plain-text snapshot every second instead of the live view; Ctrl-C stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import sys
import termios
import time
import tty
from collections import deque
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from propagation.cli import quiet_grpc_core, run_cli

if __name__ == "__main__":
    quiet_grpc_core()  # before gRPC loads: its core's INFO lines would mix with the output

from farm_ng.core.event_service_pb2 import SubscribeRequest
from farm_ng.core.stamp import StampSemantics, get_stamp_by_semantics_and_clock_type
from farm_ng.core.uri_pb2 import Uri
from google.protobuf.struct_pb2 import Struct
from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

from propagation.config import ConfigError, Entry, check_endpoint, read_config, role_of
from propagation.peers import PeerClient

if TYPE_CHECKING:
    from farm_ng.core.event_pb2 import Event

# A service that sent no /stats for this long is down. It publishes every second, so
# this allows for one late message.
DOWN_AFTER_S = 2.5
# Rates span the /stats of about this many seconds: long enough to smooth out the
# moments of a fill and drain cycle, short enough to follow a change.
RATE_WINDOW_S = 3.0
# Counts show how fast they grew over this long: a total that stopped growing (unsent 2,
# long ago) reads as 0/min, not as a problem going on.
RECENT_S = 60.0
REFRESH_S = 0.5
# --once waits for this many /stats of each service (two intervals for the rates),
# but no longer than ONCE_TIMEOUT_S.
ONCE_STATS = 3
ONCE_TIMEOUT_S = 4.0
FILL_BAR_WIDTH = 20
# The counters the tables show as rates. They only grow while a service runs, so one
# that fell means the service restarted.
RATE_COUNTERS = ("published", "received", "stored", "accepted", "drained")


# ---------------------------------------------------------------------------------
# What the services publish


@dataclasses.dataclass(frozen=True)
class Stats:
    """One ``/stats`` of a service: its figures, its number and when it was sent."""

    sequence: int
    sent: float  # the service's monotonic clock, seconds
    figures: dict[str, Any]


class ServiceView:
    """What the monitor knows about one service: its ``/stats`` of the last minute."""

    def __init__(self, entry: Entry, role: str) -> None:
        self.entry = entry
        self.name = entry.name
        self.role = role
        self.history: deque[Stats] = deque()
        self.heard: float | None = None  # the monitor's monotonic clock
        self.heard_at: float | None = None  # the same moment on the wall clock, to show
        self.received = 0

    def add(self, stats: Stats, now: float) -> None:
        """Keeps one ``/stats``; a service that restarted starts a new history."""
        self.heard = now
        self.heard_at = time.time()
        self.received += 1
        if self.history:
            last = self.history[-1]
            if stats.sequence == last.sequence:
                return  # the latched one again, after a reconnect
            if stats.sequence < last.sequence or restarted(last.figures, stats.figures):
                self.history.clear()
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
        last_seen = time.strftime("%H:%M:%S", time.localtime(self.heard_at))
        return f"down for {duration(now - self.heard)}, last seen {last_seen}"

    @property
    def figures(self) -> dict[str, Any]:
        """The latest figures; empty before the first ``/stats``."""
        return self.history[-1].figures if self.history else {}

    def rate(self, counter: str, window_s: float = RATE_WINDOW_S) -> float | None:
        """How fast a counter grew over the last ``window_s``, per second; None before two ``/stats``."""
        if len(self.history) < 2 or counter not in self.figures:
            return None
        last = self.history[-1]
        first = next(stats for stats in self.history if stats.sent >= last.sent - window_s)
        span = last.sent - first.sent
        return (last.figures[counter] - first.figures.get(counter, 0)) / span if span > 0 else None

    def per_minute(self, counter: str) -> float | None:
        """How fast a counter grew over the last minute (or as long as heard), per minute."""
        rate = self.rate(counter, RECENT_S)
        return None if rate is None else 60 * rate


def duration(seconds: float) -> str:
    """``12 s``, ``3 min 5 s`` or ``2 h 10 min``."""
    whole_s = int(seconds)
    if whole_s < 120:
        return f"{whole_s} s"
    if whole_s < 2 * 3600:
        return f"{whole_s // 60} min {whole_s % 60} s"
    return f"{whole_s // 3600} h {whole_s % 3600 // 60} min"


def restarted(before: dict[str, Any], after: dict[str, Any]) -> bool:
    """Whether a counter fell between two ``/stats``: the service started over.

    Its ``/stats`` numbering starts over too, but the monitor may have missed the
    first ones of the new process while it reconnected.
    """
    return any(after.get(counter, 0) < before.get(counter, 0) for counter in RATE_COUNTERS)


def views_of(config_path: str) -> list[ServiceView]:
    """A view for every service of the config that the monitor can watch.

    Raises:
        ConfigError: the config is bad, or has no service of this example.

    """
    views = []
    for entry in read_config(config_path):
        role = role_of(entry)
        if role is not None:
            check_endpoint(entry)
            views.append(ServiceView(entry, role))
    if not views:
        msg = f"{config_path} has no storage, supervisor or agent entry with a port"
        raise ConfigError(msg)
    return views


async def listen(view: ServiceView) -> None:
    """Follows one service's ``/stats`` until cancelled, across its restarts."""
    client = PeerClient(view.entry.service_config(), "monitor")
    request = SubscribeRequest(uri=Uri(path="/stats", query=f"service_name={view.name}"), every_n=1)
    try:
        async for event, message in client.subscribe(request, decode=True):
            if isinstance(message, Struct):
                view.add(Stats(event.sequence, sent_at(event), dict(message)), time.monotonic())
    finally:
        await client.close()


def sent_at(event: Event) -> float:
    """When the service sent an event, by its monotonic clock.

    A latched ``/stats`` arrives at once but may be a second old: its send stamp, not
    its arrival, says when its counters were true.
    """
    stamp = get_stamp_by_semantics_and_clock_type(event, StampSemantics.SERVICE_SEND, "monotonic")
    return stamp if stamp is not None else time.monotonic()


# ---------------------------------------------------------------------------------
# The tables


@dataclasses.dataclass(frozen=True)
class Look:
    """How the tables are drawn: for a terminal, or as plain text."""

    rule: str  # under each table's header; empty for none
    bar_full: str
    bar_empty: str
    quits: str  # how to quit, for the legend; empty for none


LIVE = Look("─", "█", "░", "q or Ctrl-C quits")
PLAIN = Look("", "#", ".", "")
NONE = "-"
GAP = "  "  # between columns
LEFT_ALIGNED = frozenset(("agent", "supervisor", "storage", "state", "agents"))


def legend(look: Look) -> str:
    """What the figures mean, in one line."""
    parts = [
        f"x/s: over the last {RATE_WINDOW_S:g} s",
        # "watched": a monitor that started a moment ago has seen less than a minute.
        "counts: since the service started, (n/min) over the last minute watched",
        look.quits,
    ]
    return "; ".join(part for part in parts if part)


def render(views: list[ServiceView], look: Look, now: float) -> Group:
    """The whole view: a summary line, the legend, then agents, supervisors and storage."""
    down = [view.name for view in views if not view.is_up(now)]
    summary = f"{time.strftime('%H:%M:%S')}  {len(views)} services, {len(views) - len(down)} up"
    if down:
        summary += f", down: {', '.join(down)}"
    tables = [
        table(views, "agent", look, now, AGENT_COLUMNS, agent_row),
        table(views, "supervisor", look, now, SUPERVISOR_COLUMNS, supervisor_row),
        table(views, "storage", look, now, STORAGE_COLUMNS, lambda view: storage_row(view, look)),
    ]
    parts: list[Text] = [Text(summary), Text(legend(look), style="dim")]
    for found in tables:
        if found is not None:
            parts += [Text(""), found]
    return Group(*parts)


def table(
    views: list[ServiceView],
    role: str,
    look: Look,
    now: float,
    columns: Sequence[str],
    row: Callable[[ServiceView], list[str]],
) -> Text | None:
    """A table of the services of one role, a row each; None if there are none.

    Columns are two spaces apart; the name and the state are aligned left, the figures
    right. A service that is down gets one line, which says since when, in place of its
    figures: it leaves the columns as wide as the figures of those that are up.
    """
    members = [view for view in views if view.role == role]
    if not members:
        return None
    header = [role, "state", *columns]
    rows = {view.name: [view.name, "up", *row(view)] for view in members if view.is_up(now)}
    widths = [len(heading) for heading in header]
    for cells in rows.values():
        widths = [max(width, len(cell)) for width, cell in zip(widths, cells)]
    widths[0] = max(widths[0], *(len(view.name) for view in members))
    lines = Text(no_wrap=True, overflow="crop")
    lines.append(aligned(header, header, widths), style="bold" if look.rule else "")
    if look.rule:
        lines.append("\n" + look.rule * sum(widths) + look.rule * len(GAP) * (len(widths) - 1))
    for view in members:
        lines.append("\n" + view.name.ljust(widths[0]) + GAP)
        cells = rows.get(view.name)
        if cells is None:
            lines.append(view.down_for(now), style="bold red")
            continue
        lines.append("up".ljust(widths[1]), style="green")
        lines.append(GAP + aligned(header[2:], cells[2:], widths[2:]))
    return lines


def aligned(header: Sequence[str], cells: Sequence[str], widths: Sequence[int]) -> str:
    """Cells of one line: names and words aligned left, figures right."""
    return GAP.join(
        cell.ljust(width) if heading in LEFT_ALIGNED else cell.rjust(width)
        for heading, cell, width in zip(header, cells, widths)
    )


AGENT_COLUMNS = ("configured", "samples/s", "remainder", "paused", "pauses", "latency p50/p99")


def agent_row(view: ServiceView) -> list[str]:
    """Rate x tasks, samples/s achieved, remainder, paused, pauses, propagation latency p50/p99."""
    figures = view.figures
    configured = f"{figures.get('rate', 0):g} Hz x {figures.get('num_tasks', 0):g}"
    return [
        configured,
        per_second(view.rate("published")),
        whole(figures.get("remainder")),
        "yes" if figures.get("paused") else "no",
        count(view, "pauses"),
        latency(figures.get("latency_p50_ms"), figures.get("latency_p99_ms")),
    ]


SUPERVISOR_COLUMNS = ("agents", "received/s", "stored/s", "refused", "not stored", "dropped", "unsent")


def supervisor_row(view: ServiceView) -> list[str]:
    """The agents it serves, samples received/s and stored/s, then the stores that did not happen."""
    figures = view.figures
    return [
        ", ".join(str(agent) for agent in figures.get("agents", [])) or NONE,
        per_second(view.rate("received")),
        per_second(view.rate("stored")),
        *(count(view, counter) for counter in ("refused", "not_stored", "dropped", "unsent")),
    ]


STORAGE_COLUMNS = ("fill", "stores/s", "drains/s", "refused")


def storage_row(view: ServiceView, look: Look) -> list[str]:
    """How full it is, stores/s and items drained/s, refused stores."""
    figures = view.figures
    return [
        fill_bar(int(figures.get("count", 0)), int(figures.get("max_storage", 0)), look),
        per_second(view.rate("accepted")),
        per_second(view.rate("drained")),
        count(view, "refused"),
    ]


def fill_bar(count: int, maximum: int, look: Look) -> str:
    """``[#####...............] 19/40``."""
    full = round(FILL_BAR_WIDTH * min(max(count / maximum, 0.0), 1.0)) if maximum > 0 else 0
    return f"[{look.bar_full * full}{look.bar_empty * (FILL_BAR_WIDTH - full)}] {count}/{maximum}"


def per_second(rate: float | None) -> str:
    """``50.0`` (per second), or ``-`` while unknown."""
    return NONE if rate is None else f"{rate:.1f}"


def whole(value: float | None) -> str:
    """A count, or ``-`` while unknown."""
    return NONE if value is None else f"{value:.0f}"


def count(view: ServiceView, counter: str) -> str:
    """``2 (0/min)``: the total since the service started, and how fast it grew lately."""
    total = view.figures.get(counter)
    if total is None:
        return NONE
    return f"{total:.0f} ({whole(view.per_minute(counter))}/min)"


def latency(p50: float | None, p99: float | None) -> str:
    """``5.4/15.8 ms``, or ``-`` before the agent measured any."""
    return NONE if p50 is None or p99 is None else f"{p50:.1f}/{p99:.1f} ms"


def plain_text(views: list[ServiceView], now: float) -> str:
    """The view as plain text: no colours, no trailing blanks."""
    console = Console(width=200, no_color=True, highlight=False, force_terminal=False)
    with console.capture() as capture:
        console.print(render(views, PLAIN, now))
    return "\n".join(line.rstrip() for line in capture.get().splitlines())


# ---------------------------------------------------------------------------------
# Running


async def monitor(views: list[ServiceView], once: bool) -> None:
    """Listens to every service and shows what it hears until Ctrl-C (or once)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    listeners = [asyncio.ensure_future(listen(view)) for view in views]
    try:
        if once:
            await gather_once(views, stop)
            print(plain_text(views, time.monotonic()), flush=True)
        elif sys.stdout.isatty():
            with quit_key(stop):
                await show_live(views, stop)
        else:
            await print_every_second(views, stop)
    finally:
        for listener in listeners:
            listener.cancel()
        await asyncio.gather(*listeners, return_exceptions=True)


async def gather_once(views: list[ServiceView], stop: asyncio.Event) -> None:
    """Waits until each service sent ``ONCE_STATS`` ``/stats``, or is silent.

    A service never heard from after ``DOWN_AFTER_S`` is down: no need to wait for it
    any longer. The whole wait is bounded by ``ONCE_TIMEOUT_S``.
    """
    started = time.monotonic()
    while not stop.is_set():
        elapsed = time.monotonic() - started
        waiting = [
            view for view in views if view.received < ONCE_STATS and (view.received > 0 or elapsed < DOWN_AFTER_S)
        ]
        if not waiting or elapsed >= ONCE_TIMEOUT_S:
            return
        await wait_or_stop(stop, 0.1)


@contextlib.contextmanager
def quit_key(stop: asyncio.Event) -> Iterator[None]:
    """Sets ``stop`` when q is typed in the terminal; puts the terminal back afterwards.

    The terminal goes to cbreak mode: each key comes at once, unechoed, and Ctrl-C
    still sends SIGINT. Keys are read by the event loop when they come, so the view
    never waits for one. Without a terminal on stdin, only Ctrl-C quits.
    """
    if not sys.stdin.isatty():
        yield
        return
    fd = sys.stdin.fileno()
    loop = asyncio.get_running_loop()
    saved = termios.tcgetattr(fd)

    def read_keys() -> None:
        try:
            keys = os.read(fd, 64)
        except OSError:
            keys = b""
        if not keys:  # the terminal is gone: stop reading it
            loop.remove_reader(fd)
        elif b"q" in keys.lower():
            stop.set()

    try:
        tty.setcbreak(fd)
        loop.add_reader(fd, read_keys)
        yield
    finally:
        loop.remove_reader(fd)
        # TCSADRAIN: after what the view wrote, so the last frame is not mangled.
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


async def show_live(views: list[ServiceView], stop: asyncio.Event) -> None:
    """Redraws the tables in place every ``REFRESH_S``."""
    with Live(render(views, LIVE, time.monotonic()), auto_refresh=False, transient=False) as live:
        while not stop.is_set():
            live.update(render(views, LIVE, time.monotonic()), refresh=True)
            await wait_or_stop(stop, REFRESH_S)


async def print_every_second(views: list[ServiceView], stop: asyncio.Event) -> None:
    """Prints a plain-text snapshot every second, a blank line between them."""
    while not stop.is_set():
        await wait_or_stop(stop, 1.0)
        print(plain_text(views, time.monotonic()) + "\n", flush=True)


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
