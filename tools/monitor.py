"""Monitor: a live view of every service of a config, from what they publish.

    python -m tools.monitor --service-config service_config.json          # live, in the terminal
    python -m tools.monitor --service-config service_config.json --once   # one plain-text snapshot

Each service publishes its counters on ``/stats`` (a latched ``Struct``) every second.
The monitor subscribes to them all and turns two ``/stats`` of a service into rates:
counters only grow, so a rate is the difference of two counters over the time between
them, by the service's own send stamps. A service that sent no ``/stats`` for
``DOWN_AFTER_S`` (or never) shows as down. The monitor may start before, after or
without any service, and keeps going while they stop and restart.

When stdout is not a terminal it prints a plain-text snapshot every second instead of
the live view. Ctrl-C stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import signal
import sys
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Callable, Sequence

from farm_ng.core.event_service_pb2 import SubscribeRequest
from farm_ng.core.stamp import StampSemantics, get_stamp_by_semantics_and_clock_type
from farm_ng.core.uri_pb2 import Uri
from google.protobuf.struct_pb2 import Struct
from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from propagation.cli import run_cli
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
    """What the monitor knows about one service: its recent ``/stats``."""

    def __init__(self, entry: Entry, role: str) -> None:
        self.entry = entry
        self.name = entry.name
        self.role = role
        self.history: deque[Stats] = deque()
        self.heard: float | None = None  # the monitor's monotonic clock
        self.received = 0

    def add(self, stats: Stats, now: float) -> None:
        """Keeps one ``/stats``; a service that restarted starts a new history."""
        self.heard = now
        self.received += 1
        if self.history:
            last = self.history[-1]
            if stats.sequence == last.sequence:
                return  # the latched one again, after a reconnect
            if stats.sequence < last.sequence or restarted(last.figures, stats.figures):
                self.history.clear()
        self.history.append(stats)
        while self.history[0].sent < stats.sent - RATE_WINDOW_S:
            self.history.popleft()

    def is_up(self, now: float) -> bool:
        """Whether a ``/stats`` arrived within the last ``DOWN_AFTER_S``."""
        return self.heard is not None and now - self.heard < DOWN_AFTER_S

    @property
    def figures(self) -> dict[str, Any]:
        """The latest figures; empty before the first ``/stats``."""
        return self.history[-1].figures if self.history else {}

    def rate(self, counter: str) -> float | None:
        """How fast a counter grew over the history, per second; None before two."""
        if len(self.history) < 2 or counter not in self.figures:
            return None
        first, last = self.history[0], self.history[-1]
        span = last.sent - first.sent
        return (last.figures[counter] - first.figures.get(counter, 0)) / span if span > 0 else None


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

    box: box.Box | None
    bar_full: str
    bar_empty: str


LIVE = Look(box.SIMPLE_HEAD, "█", "░")
PLAIN = Look(None, "#", ".")
NONE = "-"


def render(views: list[ServiceView], look: Look, now: float) -> Group:
    """The whole view: a summary line, then agents, supervisors and storage."""
    down = [view.name for view in views if not view.is_up(now)]
    summary = f"{time.strftime('%H:%M:%S')}  {len(views)} services, {len(views) - len(down)} up"
    if down:
        summary += f", down: {', '.join(down)}"
    tables = [
        table(views, "agent", look, now, AGENT_COLUMNS, agent_row),
        table(views, "supervisor", look, now, SUPERVISOR_COLUMNS, supervisor_row),
        table(views, "storage", look, now, STORAGE_COLUMNS, lambda view: storage_row(view, look)),
    ]
    parts: list[Text | Table] = [Text(summary)]
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
) -> Table | None:
    """A table of the services of one role, a row each; None if there are none."""
    members = [view for view in views if view.role == role]
    if not members:
        return None
    # Boxed, the column separators add a space of their own: collapse the padding
    # so that the agents' table fits in 80 columns.
    grid = Table(box=look.box, show_edge=False, pad_edge=False, collapse_padding=look.box is not None)
    grid.add_column(role, no_wrap=True)
    grid.add_column("state", no_wrap=True)
    for column in columns:
        grid.add_column(column, justify="right", no_wrap=True)
    # Cells as Text: a string cell would be read as rich markup, "[###...]" included.
    for view in members:
        if view.is_up(now):
            grid.add_row(view.name, Text("up", style="green"), *(Text(cell) for cell in row(view)))
        else:
            grid.add_row(view.name, Text("down", style="bold red"), *[Text(NONE)] * len(columns), style="dim")
    return grid


AGENT_COLUMNS = ("configured", "samples/s", "remainder", "paused", "latency p50/p99")


def agent_row(view: ServiceView) -> list[str]:
    """Rate x tasks, samples/s achieved, remainder, paused, propagation latency p50/p99."""
    figures = view.figures
    configured = f"{figures.get('rate', 0):g} Hz x {figures.get('num_tasks', 0):g}"
    return [
        configured,
        per_second(view.rate("published")),
        whole(figures.get("remainder")),
        "yes" if figures.get("paused") else "no",
        latency(figures.get("latency_p50_ms"), figures.get("latency_p99_ms")),
    ]


SUPERVISOR_COLUMNS = ("received/s", "stored/s", "refused", "not stored", "dropped", "unsent")


def supervisor_row(view: ServiceView) -> list[str]:
    """Samples received/s and stored/s, then the stores that did not happen, in total."""
    figures = view.figures
    return [
        per_second(view.rate("received")),
        per_second(view.rate("stored")),
        *(whole(figures.get(counter)) for counter in ("refused", "not_stored", "dropped", "unsent")),
    ]


STORAGE_COLUMNS = ("fill", "stores/s", "drains/s", "refused")


def storage_row(view: ServiceView, look: Look) -> list[str]:
    """How full it is, stores/s and items drained/s, refused stores in total."""
    figures = view.figures
    return [
        fill_bar(int(figures.get("count", 0)), int(figures.get("max_storage", 0)), look),
        per_second(view.rate("accepted")),
        per_second(view.rate("drained")),
        whole(figures.get("refused")),
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


def latency(p50: float | None, p99: float | None) -> str:
    """``5.4/15.8 ms``, or ``-`` before the agent measured any."""
    return NONE if p50 is None or p99 is None else f"{p50:.1f}/{p99:.1f} ms"


def plain_text(views: list[ServiceView], now: float) -> str:
    """The view as plain text: no colours, no box, no trailing blanks."""
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
