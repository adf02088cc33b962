"""Measures the services: agent rates, propagation latency, the relay ceiling, CPU and memory.

    python -m tools.bench             # one run of 5 s windows, about two and a half minutes
    python -m tools.bench --quick     # 1 s windows, under a minute: rougher figures
    python -m tools.bench --runs 3    # the median of three runs of every figure (the README's table)

It starts the real scripts (``agent.py``, ``supervisor.py``, ``storage.py``) as processes,
on free localhost ports, from configs it writes to a temporary directory. It reads the
figures the services publish on ``/stats`` and ``/health`` and the CPU time and memory of
their processes, and prints one table. Every figure that involves a supervisor is measured
twice in the same run, with the supervisor's defaults (``max_in_flight=8``, batches of up
to ``max_batch=32``) and as the one-at-a-time design (``max_in_flight=1``, ``max_batch=1``),
one after the other, and the table gives their ratio.

Every figure of a step covers one interval, the same for all its services; counters are
read between each service's ``/stats`` around its ends (see ``Window``). ``--quick``
runs the agent-rate steps side by side to stay under a minute.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import itertools
import json
import logging
import math
import os
import platform
import signal
import socket
import statistics
import sys
import tempfile
import time
from collections import deque
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable, Sequence

# This process talks gRPC and forks the services: gRPC's fork handlers, with its
# threads busy, can abort a process ("Check failed" in thd.h). The children exec at
# once and need none. Read by gRPC when it is first imported, hence before it.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
# Its core's INFO lines ("Got goaway") each time a step's services stop: noise.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import grpc
import psutil
from farm_ng.core.event_service_pb2 import SubscribeRequest
from farm_ng.core.stamp import StampSemantics
from farm_ng.core.uri_pb2 import Uri

from propagation.config import ConfigError, find_entry, read_config
from propagation.peers import PeerClient

if TYPE_CHECKING:
    from farm_ng.core.event_pb2 import Event
    from farm_ng.core.event_service_pb2 import EventServiceConfig

ROOT = Path(__file__).resolve().parent.parent
# The name the benchmark's clients give themselves, and their logger's.
BENCH_CLIENT = "bench"
# A service needs about 0.6 s to serve on a quiet machine; a busy or small one (load 16
# on 2 cores took over 15 s) needs more. One that dies is reported at once anyway.
SERVING_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 5.0
# Services publish /stats every second; a few missed ones mean something is wrong.
STATS_TIMEOUT_S = 10.0
# A service publishes /health a moment (milliseconds) before /stats on each beat:
# a /health this much before a /stats is of the same beat.
HEALTH_SLACK_S = 0.1
# How much of a service's output to show when it fails.
OUTPUT_TAIL_BYTES = 3000

IN_FLIGHT = (8, 1)
# (rate, num_tasks) of the agent-rate rows.
RATE_STEPS = ((10, 1), (100, 1), (1000, 1), (100, 10))
# agent-3's rate in the default config for the latency rows (it is 100 there).
LATENCY_RATES = (200, 500, 1000)
# agent-3's rate for the row of samples not stored.
UNSTORED_RATE = 1000
# The offered load (samples/s from one agent task) while looking for the relay ceiling.
CEILING_RATES = (250, 500, 1000, 2000, 4000)
# The agent-rate rows that need a step of their own: the others are ceiling steps.
OWN_RATE_STEPS = tuple((rate, tasks) for rate, tasks in RATE_STEPS if tasks > 1 or rate not in CEILING_RATES)
# The relay rate at which CPU per relayed sample is measured, at WARNING and at INFO.
CPU_RATE = 500
# Enough room that storage never refuses in a benchmark, and still an int32 residual.
UNBOUNDED_STORAGE = 1_000_000_000

DEFAULT_WINDOW_S = 5.0
QUICK_WINDOW_S = 1.0


class BenchError(Exception):
    """A service did not start, died, or stopped publishing its figures."""


# ---------------------------------------------------------------------------------
# One service process and what it publishes


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """One ``/stats`` message of a service, with its process's resources at that moment."""

    # The service's monotonic clock when it computed the figures (the event's send
    # stamp); the same clock as time.monotonic() here.
    stamp: float
    figures: dict[str, Any]
    cpu_s: float
    rss_bytes: int


def send_stamp(event: Event) -> float:
    """When the service sent an event, on its monotonic clock."""
    for stamp in event.timestamps:
        if stamp.semantics == StampSemantics.SERVICE_SEND and stamp.clock_name.endswith("/monotonic"):
            return stamp.stamp
    return time.monotonic()  # not stamped: the time it arrived is the next best


class Service:
    """A service's process, its output kept short, and its ``/stats`` and ``/health``."""

    def __init__(self, config: EventServiceConfig, process: asyncio.subprocess.Process) -> None:
        self.name = config.name
        self.config = config
        self.process = process
        self._resources = psutil.Process(process.pid)
        self._tail = b""
        self._new_stats = asyncio.Condition()
        self.latest: Snapshot | None = None
        # Enough for a window of any length the benchmark uses: one a second.
        self.history: deque[Snapshot] = deque(maxlen=64)
        # (send stamp, figures) of its /health (farm-ng-core's, e.g. "/sample/dropped"):
        # published on a beat of its own, so read at its own stamps.
        self.health: deque[tuple[float, dict[str, Any]]] = deque(maxlen=64)
        self.client = PeerClient(self.config, BENCH_CLIENT)
        # Seconds from SIGTERM to its exit; None if it did not exit by itself in time.
        self.stopped_in: float | None = None
        self._output = asyncio.ensure_future(self._read_output())
        self._watchers = [
            asyncio.ensure_future(self._watch_stats()),
            asyncio.ensure_future(self._watch_health()),
        ]

    @classmethod
    async def start(cls, config_path: Path, name: str) -> Service:
        """Starts ``python <role>.py`` for entry ``name`` and waits until it serves.

        Raises:
            BenchError: it exited or did not serve within ``SERVING_TIMEOUT_S``.

        """
        entry = find_entry(read_config(str(config_path)), name)
        config = entry.service_config()
        role = entry.role
        if role is None:
            msg = f"{name}: not a service of this example"
            raise BenchError(msg)
        script = f"{role}.py"
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            str(ROOT / script),
            "--service-config",
            str(config_path),
            "--service-name",
            name,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            # Its own session: Ctrl-C reaches the benchmark alone, which stops the
            # services itself.
            start_new_session=True,
        )
        service = cls(config, process)
        try:
            await service._wait_serving()
        except BaseException:
            await service.stop()
            raise
        return service

    async def _wait_serving(self) -> None:
        # The first /stats (latched, published as it starts) says it serves. Its
        # "serving on" line would too, but a WARNING entry does not print it.
        published = asyncio.ensure_future(self._first_stats())
        exited = asyncio.ensure_future(self.process.wait())
        try:
            await asyncio.wait([published, exited], timeout=SERVING_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED)
        finally:
            exited.cancel()
            published.cancel()
        if self.latest is None:
            await asyncio.wait([self._output], timeout=1.0)  # the last words of a dying service
            how = "exited" if self.process.returncode is not None else f"was not serving after {SERVING_TIMEOUT_S:g} s"
            msg = f"{self.name} {how}:\n{self.output_tail()}"
            raise BenchError(msg)

    async def _first_stats(self) -> None:
        async with self._new_stats:
            await self._new_stats.wait_for(lambda: self.latest is not None)

    async def _read_output(self) -> None:
        """Reads the output in chunks, keeping only its end: cheap even at INFO."""
        assert self.process.stdout is not None
        while True:
            chunk = await self.process.stdout.read(65536)
            if not chunk:
                return
            self._tail = (self._tail + chunk)[-OUTPUT_TAIL_BYTES:]

    def output_tail(self) -> str:
        """The end of what it printed."""
        return self._tail.decode(errors="replace").rstrip()

    async def _watch_stats(self) -> None:
        request = SubscribeRequest(uri=Uri(path="/stats", query=f"service_name={self.name}"), every_n=1)
        async for event, message in self.client.subscribe(request, decode=True):
            times = self._resources.cpu_times()
            snapshot = Snapshot(
                stamp=send_stamp(event),
                figures=dict(message),  # type: ignore[call-overload]
                cpu_s=times.user + times.system,
                rss_bytes=self._resources.memory_info().rss,
            )
            async with self._new_stats:
                self.latest = snapshot
                self.history.append(snapshot)
                self._new_stats.notify_all()

    async def _watch_health(self) -> None:
        request = SubscribeRequest(uri=Uri(path="/health", query=f"service_name={self.name}"), every_n=1)
        async for event, message in self.client.subscribe(request, decode=True):
            async with self._new_stats:
                self.health.append((send_stamp(event), dict(message)))  # type: ignore[call-overload]
                self._new_stats.notify_all()

    async def snapshot_where(self, wanted: Callable[[Snapshot], bool], what: str) -> Snapshot:
        """The first ``/stats`` snapshot, from the latest on, that is ``wanted``.

        Raises:
            BenchError: none came within ``STATS_TIMEOUT_S`` (``what`` says what was awaited).

        """

        def found() -> bool:
            return self.latest is not None and wanted(self.latest)

        await self._until(found, f"/stats with {what}")
        assert self.latest is not None
        return self.latest

    async def health_until(self, moment: float) -> None:
        """Waits for the ``/health`` of the beat of ``moment``, or a later one.

        A service publishes ``/health`` a moment before ``/stats`` on each beat: one up
        to ``HEALTH_SLACK_S`` before ``moment`` is that beat's.

        Raises:
            BenchError: none came within ``STATS_TIMEOUT_S``.

        """

        def came() -> bool:
            return bool(self.health) and self.health[-1][0] >= moment - HEALTH_SLACK_S

        await self._until(came, "/health")

    async def _until(self, condition: Callable[[], bool], what: str) -> None:
        """Waits until ``condition()`` holds after a new /stats or /health; ``what`` names it."""
        async with self._new_stats:
            try:
                await asyncio.wait_for(self._new_stats.wait_for(condition), STATS_TIMEOUT_S)
            except asyncio.TimeoutError:
                msg = f"{self.name} published no {what} within {STATS_TIMEOUT_S:g} s:\n{self.output_tail()}"
                raise BenchError(msg) from None

    async def stop(self) -> None:
        """Stops watching, then SIGTERM, then SIGKILL after ``STOP_TIMEOUT_S``."""
        for watcher in self._watchers:
            watcher.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)
        await self.client.close()
        if self.process.returncode is None:
            asked = time.monotonic()
            self.process.terminate()
            try:
                await asyncio.wait_for(self.process.wait(), STOP_TIMEOUT_S)
                self.stopped_in = time.monotonic() - asked
            except asyncio.TimeoutError:
                # It may exit between the timeout and the kill, on a starved machine.
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
                await self.process.wait()
        await asyncio.wait([self._output], timeout=1.0)
        self._output.cancel()


class SequenceCounter:
    """Counts the events of an agent's ``/sample`` and the sequence numbers seen twice.

    Its own client and raw payloads: it only reads each event's ``sequence``.
    """

    def __init__(self, service: Service) -> None:
        self.received = 0
        self.duplicates = 0
        self._seen: set[int] = set()
        self._client = PeerClient(service.config, BENCH_CLIENT)
        request = SubscribeRequest(uri=Uri(path="/sample", query=f"service_name={service.name}"), every_n=1)
        self._task = asyncio.ensure_future(self._count(self._client.subscribe(request, decode=False)))

    async def _count(self, events: AsyncIterator[tuple[Event, Any]]) -> None:
        async for event, _ in events:
            self.received += 1
            if event.sequence in self._seen:
                self.duplicates += 1
            self._seen.add(event.sequence)

    async def stop(self) -> None:
        """Stops reading."""
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        await self._client.close()


# ---------------------------------------------------------------------------------
# A set of services from one config


class Ports:
    """Free TCP ports, none handed out twice in one benchmark.

    Systems start side by side: a port free now may be one another system was given
    a moment ago and has not bound yet, or the same one the OS offers again.
    """

    def __init__(self) -> None:
        self._given: set[int] = set()

    def free(self) -> int:
        """A port nothing listens on now and not handed out before."""
        while True:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
            if port not in self._given:
                self._given.add(port)
                return port


class System:
    """The services of one config, on free ports, started together and stopped together.

    Each measurement gets a system of its own: fresh processes start every step from
    the same state.
    """

    def __init__(self, path: Path, entries: list[dict[str, Any]], ports: Ports) -> None:
        self.path = path
        self.entries = [dict(entry, port=ports.free()) for entry in entries]
        self.services: dict[str, Service] = {}

    async def start(self) -> None:
        """Starts every service at once (they may start in any order); waits until all serve.

        Those that started are in ``services`` even if this fails or is cancelled: the
        caller stops them.

        Raises:
            BenchError: one did not start.

        """
        self.path.write_text(json.dumps({"configs": self.entries}, indent=2))
        starting = {
            entry["name"]: asyncio.ensure_future(Service.start(self.path, entry["name"])) for entry in self.entries
        }
        try:
            await asyncio.gather(*starting.values(), return_exceptions=True)
        finally:
            for name, task in starting.items():
                if task.done() and not task.cancelled() and task.exception() is None:
                    self.services[name] = task.result()
        for task in starting.values():
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]

    async def stop(self) -> list[Service]:
        """Stops every service at once; returns them, stopped."""
        services, self.services = list(self.services.values()), {}
        await asyncio.gather(*(service.stop() for service in services))
        return services


def default_entries(in_flight: int) -> list[dict[str, Any]]:
    """service_config.json's services as they are, with the supervisors' ``max_in_flight`` set."""
    entries = []
    for entry in json.loads((ROOT / "service_config.json").read_text())["configs"]:
        if not entry["name"].startswith(("storage", "supervisor", "agent")):
            continue  # e.g. a recorder entry: not ours to run
        if entry["name"].startswith("supervisor"):
            kept = [arg for arg in entry.get("args", []) if not arg.replace(" ", "").startswith("max_")]
            entry = dict(entry, args=[*kept, *relay_design(in_flight)])  # noqa: PLW2901
        entries.append(entry)
    return entries


RELAY_AGENT = "agent-1"
RELAY_SUPERVISOR = "supervisor-1"
RELAY_NAMES = (RELAY_AGENT, RELAY_SUPERVISOR, "storage")


def relay_entries(in_flight: int, log_level: str, rate: float, num_tasks: int = 1) -> list[dict[str, Any]]:
    """One agent, one supervisor relaying every sample, storage that never fills."""
    return [
        storage_entry(log_level),
        supervisor_entry(RELAY_SUPERVISOR, RELAY_AGENT, in_flight, log_level),
        agent_entry(RELAY_AGENT, rate, num_tasks, log_level),
    ]


def storage_entry(log_level: str) -> dict[str, Any]:
    """A storage that never fills."""
    return {
        "name": "storage",
        "host": "localhost",
        "log_level": log_level,
        "args": [f"max_storage={UNBOUNDED_STORAGE}", "batch_size=1"],
    }


def supervisor_entry(name: str, agent: str, in_flight: int, log_level: str) -> dict[str, Any]:
    """A supervisor that relays every sample of one agent (confidence 0)."""
    subscription = {"uri": {"path": "/sample", "query": f"service_name={agent}"}, "every_n": 1}
    return {
        "name": name,
        "host": "localhost",
        "log_level": log_level,
        "args": ["confidence=0", *relay_design(in_flight)],
        "subscriptions": [subscription],
    }


def agent_entry(name: str, rate: float, num_tasks: int, log_level: str) -> dict[str, Any]:
    """An agent."""
    return {"name": name, "host": "localhost", "log_level": log_level, "args": agent_args(rate, num_tasks)}


def relay_design(in_flight: int) -> list[str]:
    """A supervisor's args for ``in_flight`` relays at once.

    At 1 it is the one-at-a-time design: one sample per store call too.
    """
    return [f"max_in_flight={in_flight}", "max_batch=1"] if in_flight == 1 else [f"max_in_flight={in_flight}"]


def agent_args(rate: float, num_tasks: int) -> list[str]:
    """An agent entry's args."""
    return [f"rate={rate:g}", f"num_tasks={num_tasks}"]


# ---------------------------------------------------------------------------------
# Measuring a window


@dataclasses.dataclass(frozen=True)
class Window:
    """One measurement interval, common to every service, and each service's figures around it.

    Each service publishes ``/stats`` (and ``/health``) on its own beat, once a second,
    so no two services' snapshots share a moment. A service's counter at either end of
    the interval is read between its two snapshots around that moment, as if it grew
    evenly in between: every figure of a row then covers the same interval (stored
    and published of one relay step included), not windows up to a second apart.
    """

    opens: float  # the services' monotonic clock (one host)
    closes: float
    snapshots: dict[str, list[Snapshot]]
    health: dict[str, list[tuple[float, dict[str, Any]]]]

    def seconds(self) -> float:
        """The length of the interval."""
        return self.closes - self.opens

    def _grown(self, points: Sequence[tuple[float, float]], slack: float = 0.0) -> float:
        """How much a value, given at ``(stamp, value)`` points, grew over the interval."""
        return at(points, self.closes, slack) - at(points, self.opens, slack)

    def per_second(self, name: str, *keys: str) -> float:
        """How fast the sum of ``name``'s ``/stats`` counters ``keys`` grew."""
        snapshots = self.snapshots[name]
        grown = sum(self._grown([(shot.stamp, shot.figures.get(key, 0)) for shot in snapshots]) for key in keys)
        return grown / self.seconds()

    def health_per_second(self, name: str, key: str) -> float:
        """How fast one of ``name``'s ``/health`` counters grew."""
        points = [(stamp, figures.get(key, 0)) for stamp, figures in self.health[name]]
        return self._grown(points, HEALTH_SLACK_S) / self.seconds()

    def cpu_share(self, name: str) -> float:
        """CPU seconds ``name``'s process used per second of the interval."""
        return self._grown([(shot.stamp, shot.cpu_s) for shot in self.snapshots[name]]) / self.seconds()

    def end(self, name: str) -> Snapshot:
        """``name``'s first snapshot at or after the interval closed."""
        return next(snapshot for snapshot in self.snapshots[name] if snapshot.stamp >= self.closes)

    def figure(self, name: str, key: str) -> float:
        """One of ``name``'s figures at the end of the interval (NaN if it has none)."""
        return float(self.end(name).figures.get(key, float("nan")))


def at(points: Sequence[tuple[float, float]], moment: float, slack: float = 0.0) -> float:
    """A value at ``moment``, read on the line between the two ``(stamp, value)`` points around it.

    Some ``points`` are at or before ``moment``; some at or after it, or else the last
    one is at most ``slack`` before it and stands for it.
    """
    before = max((point for point in points if point[0] <= moment), key=lambda point: point[0])
    after = min((point for point in points if point[0] >= moment), key=lambda point: point[0], default=None)
    if after is None and moment - before[0] <= slack:
        return before[1]
    if after is None:
        msg = f"no figures after {moment:.3f} (the last at {before[0]:.3f})"
        raise BenchError(msg)
    if after[0] == before[0]:
        return before[1]
    return before[1] + (moment - before[0]) / (after[0] - before[0]) * (after[1] - before[1])


async def measure(system: System, window_s: float) -> Window:
    """Measures every service of ``system`` over about ``window_s``, once samples flow.

    The interval opens when the last service to show samples going through it (in its
    ``/stats``) does so: every service was flowing by then (or, if later, when the
    first ``/health`` the benchmark heard of a service was sent). It closes at the first
    moment by which every service has sent a ``/stats`` about ``window_s`` after that.
    The services started together and publish once a second from their start, so
    their beats are a fraction of a second apart: the interval is a little shorter
    than ``window_s`` (by that fraction), and takes no longer to measure than each
    service's own window would.
    """
    services = list(system.services.values())
    starts = await asyncio.gather(*(service.snapshot_where(is_flowing, "samples flowing") for service in services))
    # /health is not latched: the first one the benchmark hears may come after the flow
    # began (its subscription late on a busy machine). The interval opens once a /health
    # of every service is known too, so that its counters can be read at the opening.
    await asyncio.gather(*(service.health_until(-math.inf) for service in services))
    opens = max(*(start.stamp for start in starts), *(service.health[0][0] for service in services))
    ends = await asyncio.gather(
        *(service.snapshot_where(window_end(opens, window_s), "a new snapshot") for service in services)
    )
    closes = min(end.stamp for end in ends)
    await asyncio.gather(*(service.health_until(closes) for service in services))
    return Window(
        opens,
        closes,
        snapshots={
            service.name: [shot for shot in service.history if start.stamp <= shot.stamp <= end.stamp]
            for service, start, end in zip(services, starts, ends)
        },
        health={service.name: list(service.health) for service in services},
    )


def window_end(opens: float, window_s: float) -> Callable[[Snapshot], bool]:
    """Whether a snapshot is late enough to close a window that opened at ``opens``."""
    # A little short of window_s: /stats come every second plus the time to publish,
    # and the other services' beats a fraction of a second before or after.
    wanted = opens + window_s - min(0.5, window_s / 2)
    return lambda snapshot: snapshot.stamp > opens and snapshot.stamp >= wanted


def is_flowing(snapshot: Snapshot) -> bool:
    """Whether samples have gone through a service: stored, or relayed back to an agent."""
    figures = snapshot.figures
    if "residuals" in figures:  # an agent
        return figures["residuals"] > 0
    if "stored" in figures:  # a supervisor
        return figures["stored"] > 0
    return figures.get("accepted", 0) > 0  # storage


# ---------------------------------------------------------------------------------
# The rows of the table


@dataclasses.dataclass(frozen=True)
class Row:
    """One row: a label, how to show its numbers, and whether it has a value per column."""

    label: str
    form: str  # one format for each number, e.g. "{:.1f} / {:.1f}"
    per_column: bool = True


def rate_label(rate: float, num_tasks: int) -> str:
    """The label of an agent-rate row."""
    tasks = "1 task" if num_tasks == 1 else f"{num_tasks} tasks"
    return f"agent rate, achieved/configured: {rate:g} Hz x {tasks}"


DUPLICATES = "duplicate sequence numbers on /sample, {:g} Hz x {} tasks: duplicates / received".format(
    *next(step for step in RATE_STEPS if step[1] > 1)
)
UNSTORED = f"agent-3 at {UNSTORED_RATE} Hz: unstored/s (dropped + not stored + refused + agent queue) / relayable/s"
CEILING = "relay ceiling: best stored/s over the steps"
CPU_WARNING = f"CPU s per 1000 relayed at {CPU_RATE}/s, WARNING: agent / supervisor / storage"
CPU_INFO = f"CPU s per 1000 relayed at {CPU_RATE}/s, INFO: agent / supervisor / storage"
RSS = "RSS MB after the ceiling steps: agent / supervisor / storage"
ROLES = ("agent", "supervisor", "storage")
STOP = "stop after SIGTERM, ms, slowest of every step's services: agent / supervisor / storage"


def latency_label(what: str) -> str:
    """The label of a latency row."""
    return f"latency ms p50 / p90 / p99, {what}"


def default_latency_label(agent: str) -> str:
    """The label of a latency row at the default config."""
    return latency_label(f"default config, {agent}")


def rate_latency_label(rate: float) -> str:
    """The label of a latency row with agent-3 at another rate."""
    return latency_label(f"agent-3 at {rate:g} Hz")


def ceiling_step_label(rate: float) -> str:
    """The label of one step towards the relay ceiling."""
    return f"relay at {rate:g}/s offered: published / stored / lost per s"


def rows() -> list[Row]:
    """Every row of the table, in order."""
    triple = "{:.2f} / {:.2f} / {:.2f}"
    return [
        *(Row(rate_label(rate, tasks), "{:.3f}", per_column=False) for rate, tasks in RATE_STEPS),
        Row(DUPLICATES, "{:.0f} / {:.0f}", per_column=False),
        *(Row(default_latency_label(agent), triple) for agent in ("agent-1", "agent-2", "agent-3")),
        *(Row(rate_latency_label(rate), triple) for rate in LATENCY_RATES),
        Row(UNSTORED, "{:.0f} / {:.0f}"),
        *(Row(ceiling_step_label(rate), "{:.0f} / {:.0f} / {:.0f}") for rate in CEILING_RATES),
        Row(CEILING, "{:.0f}"),
        Row(CPU_WARNING, "{:.3f} / {:.3f} / {:.3f}"),
        Row(CPU_INFO, "{:.3f} / {:.3f} / {:.3f}"),
        Row(RSS, "{:.0f} / {:.0f} / {:.0f}"),
        Row(STOP, "{:.0f} / {:.0f} / {:.0f}", per_column=False),
    ]


def latencies(window: Window, agent: str) -> tuple[float, ...]:
    """An agent's propagation latency percentiles (over its last 5 s)."""
    return tuple(window.figure(agent, f"latency_p{p}_ms") for p in (50, 90, 99))


def unstored(window: Window, supervisor: str, agent: str) -> tuple[float, float]:
    """Samples above confidence that were not stored, per s, and all above confidence per s.

    Counts the supervisor's dropped, not stored and refused ones, and those the agent's
    server dropped because the supervisor's subscription queue was full.
    """
    lost = window.per_second(supervisor, "dropped", "not_stored", "refused")
    queue_lost = window.health_per_second(agent, "/sample/dropped")
    relayable = window.per_second(supervisor, "received") - window.per_second(supervisor, "below_confidence")
    return lost + queue_lost, relayable + queue_lost


def cpu_per_thousand(window: Window, names: Sequence[str], supervisor: str) -> tuple[float, ...]:
    """CPU seconds each process used per 1000 samples the supervisor stored."""
    stored = window.per_second(supervisor, "stored")
    return tuple(1000 * window.cpu_share(name) / stored if stored else float("nan") for name in names)


class Runner:
    """Runs measurement steps, each on a system of its own, and collects the figures."""

    def __init__(self, directory: Path, window_s: float, jobs: int = 1) -> None:
        self._directory = directory
        self._window_s = window_s
        # Steps under way at once: 1, but for the test suite's quick check.
        self.slots = asyncio.Semaphore(jobs)
        self._steps = itertools.count(1)
        self._ports = Ports()
        self._stopping: list[asyncio.Future[list[Service]]] = []
        # Each role's stop times after SIGTERM (inf: killed after STOP_TIMEOUT_S).
        self.stop_times: dict[str, list[float]] = {role: [] for role in ROLES}
        self.figures: dict[str, dict[int, tuple[float, ...]]] = {row.label: {} for row in rows()}

    async def step(
        self, entries: list[dict[str, Any]], count_sequences_of: str | None = None
    ) -> tuple[Window, SequenceCounter | None]:
        """Starts the services of ``entries``, measures one window, stops them.

        Args:
            entries: The config's entries, without ports.
            count_sequences_of: An agent whose ``/sample`` sequence numbers to check.

        Returns:
            The window, and the sequence numbers seen if asked for.

        """
        system = System(self._directory / f"step-{next(self._steps)}.json", entries, self._ports)
        counter = None
        try:
            await system.start()
            # The last step's services stopped while these started; none is left
            # when the window opens.
            await self.finish_stopping()
            if count_sequences_of is not None:
                counter = SequenceCounter(system.services[count_sequences_of])
            window = await measure(system, self._window_s)
        finally:
            if counter is not None:
                await counter.stop()
            self._stopping.append(asyncio.ensure_future(system.stop()))
        return window, counter

    async def finish_stopping(self) -> None:
        """Waits until the services of finished steps have stopped."""
        while self._stopping:
            stopping, self._stopping = self._stopping, []
            # wait(), not gather(): cancelling the caller must not cancel the stops.
            await asyncio.wait(stopping)
            for stop in stopping:
                if not stop.cancelled() and stop.exception() is not None:
                    raise stop.exception()  # type: ignore[misc]
            for stop in stopping:
                for service in stop.result() if not stop.cancelled() else []:
                    role = service.name.split("-", 1)[0]
                    took = service.stopped_in if service.stopped_in is not None else math.inf
                    self.stop_times.setdefault(role, []).append(took)


async def latency_step(runner: Runner, in_flight: int, agent_3_rate: float | None) -> None:
    """The default config, or with agent-3 at another rate: the propagation latency."""
    entries = default_entries(in_flight)
    if agent_3_rate is not None:
        for entry in entries:
            if entry["name"] == "agent-3":
                entry["args"] = agent_args(agent_3_rate, 1)
    window, _ = await runner.step(entries)
    figures = runner.figures
    if agent_3_rate is None:
        for agent in ("agent-1", "agent-2", "agent-3"):
            figures[default_latency_label(agent)][in_flight] = latencies(window, agent)
        return
    figures[rate_latency_label(agent_3_rate)][in_flight] = latencies(window, "agent-3")
    if agent_3_rate == UNSTORED_RATE:
        figures[UNSTORED][in_flight] = unstored(window, "supervisor-2", "agent-3")


async def relay_step(runner: Runner, in_flight: int, rate: float, num_tasks: int = 1) -> None:
    """One agent relayed at WARNING: its rate, and a step towards the relay ceiling."""
    entries = relay_entries(in_flight, "WARNING", rate, num_tasks)
    window, counter = await runner.step(entries, RELAY_AGENT if num_tasks > 1 else None)
    figures = runner.figures
    if (rate, num_tasks) in RATE_STEPS and in_flight == IN_FLIGHT[0]:
        published = window.per_second(RELAY_AGENT, "published")
        figures[rate_label(rate, num_tasks)][in_flight] = (published / (rate * num_tasks),)
    if counter is not None:
        figures[DUPLICATES][in_flight] = (counter.duplicates, counter.received)
    if num_tasks == 1 and rate in CEILING_RATES:
        published = window.per_second(RELAY_AGENT, "published")
        stored = window.per_second(RELAY_SUPERVISOR, "stored")
        lost, _ = unstored(window, RELAY_SUPERVISOR, RELAY_AGENT)
        figures[ceiling_step_label(rate)][in_flight] = (published, stored, lost)
    if num_tasks == 1 and rate == CPU_RATE:
        figures[CPU_WARNING][in_flight] = cpu_per_thousand(window, RELAY_NAMES, RELAY_SUPERVISOR)
    if num_tasks == 1 and rate == CEILING_RATES[-1]:
        figures[RSS][in_flight] = tuple(window.end(name).rss_bytes / 2**20 for name in RELAY_NAMES)


async def rates_step(runner: Runner) -> None:
    """``--quick``: the agent-rate steps side by side, each agent with a supervisor of its own.

    One storage (that never fills) for them all, every service at WARNING: the figures
    their own steps give, on a machine that runs the others' services too.
    """
    entries = [storage_entry("WARNING")]
    agents = {}
    for number, (rate, tasks) in enumerate(OWN_RATE_STEPS, 1):
        agent = f"agent-{number}"
        entries.append(supervisor_entry(f"supervisor-{number}", agent, IN_FLIGHT[0], "WARNING"))
        entries.append(agent_entry(agent, rate, tasks, "WARNING"))
        agents[agent] = (rate, tasks)
    counted = next(agent for agent, (_, tasks) in agents.items() if tasks > 1)
    window, counter = await runner.step(entries, counted)
    for agent, (rate, tasks) in agents.items():
        published = window.per_second(agent, "published")
        runner.figures[rate_label(rate, tasks)][IN_FLIGHT[0]] = (published / (rate * tasks),)
    if counter is not None:
        runner.figures[DUPLICATES][IN_FLIGHT[0]] = (counter.duplicates, counter.received)


async def info_step(runner: Runner, in_flight: int) -> None:
    """The CPU per relayed sample with every service at INFO, its output read from a pipe."""
    window, _ = await runner.step(relay_entries(in_flight, "INFO", CPU_RATE))
    runner.figures[CPU_INFO][in_flight] = cpu_per_thousand(window, RELAY_NAMES, RELAY_SUPERVISOR)


@dataclasses.dataclass(frozen=True)
class Step:
    """One measurement: what it is, and the coroutine that makes it."""

    what: str
    run: Callable[[Runner], Awaitable[None]]


def plan(quick: bool = False) -> list[Step]:
    """Every step of one run. The two columns of a row are measured one right after the other.

    With ``quick``, the agent-rate steps run side by side as one step.
    """
    steps: list[Step] = []
    for rate in (None, *LATENCY_RATES):
        what = "default config" if rate is None else f"default config, agent-3 at {rate:g} Hz"
        steps += both_designs(what, functools.partial(latency_step, agent_3_rate=rate))
    if quick:
        rates = ", ".join(f"{rate:g} Hz x {tasks}" for rate, tasks in OWN_RATE_STEPS)
        steps.append(Step(f"agents at {rates}, side by side", rates_step))
    else:
        steps += [
            Step(
                f"agent at {rate:g} Hz x {tasks}",
                functools.partial(relay_step, in_flight=IN_FLIGHT[0], rate=rate, num_tasks=tasks),
            )
            for rate, tasks in OWN_RATE_STEPS
        ]
    for rate in CEILING_RATES:
        steps += both_designs(f"relay at {rate:g}/s", functools.partial(relay_step, rate=rate))
    steps += both_designs(f"relay at {CPU_RATE}/s at INFO", info_step)
    return steps


def both_designs(what: str, measure: Callable[..., Awaitable[None]]) -> list[Step]:
    """A step for each column: ``measure`` with each ``in_flight`` of ``IN_FLIGHT``."""
    return [
        Step(f"{what}, max_in_flight={in_flight}", functools.partial(measure, in_flight=in_flight))
        for in_flight in IN_FLIGHT
    ]


async def run_step(runner: Runner, step: Step, number: int, total: int) -> None:
    """Runs one step when a slot is free, saying which (on stderr: the table is on stdout)."""
    async with runner.slots:
        print(f"[{number}/{total}] {step.what}", file=sys.stderr, flush=True)
        await step.run(runner)


async def run_once(
    directory: Path, window_s: float, jobs: int, quick: bool = False
) -> dict[str, dict[int, tuple[float, ...]]]:
    """One run of every step (``quick``: the agent-rate steps side by side); returns its figures."""
    runner = Runner(directory, window_s, jobs)
    planned = plan(quick)
    steps = [
        asyncio.ensure_future(run_step(runner, step, number, len(planned))) for number, step in enumerate(planned, 1)
    ]
    try:
        await asyncio.gather(*steps)
    finally:
        for step in steps:  # after a failure, the others end too
            step.cancel()
        await asyncio.wait(steps)
        for step in steps:
            if not step.cancelled():
                step.exception()  # seen: no "exception never retrieved" warning
        await runner.finish_stopping()
    figures = runner.figures
    for in_flight in IN_FLIGHT:
        stored = [figures[ceiling_step_label(rate)][in_flight][1] for rate in CEILING_RATES]
        figures[CEILING][in_flight] = (max(stored),)
    figures[STOP][IN_FLIGHT[0]] = tuple(1000 * max(runner.stop_times[role], default=math.nan) for role in ROLES)
    return figures


# ---------------------------------------------------------------------------------
# The table


def median_figures(runs: list[dict[str, dict[int, tuple[float, ...]]]]) -> dict[str, dict[int, tuple[float, ...]]]:
    """The median of each number over the runs."""
    merged: dict[str, dict[int, tuple[float, ...]]] = {}
    for label in runs[0]:
        merged[label] = {}
        for in_flight in runs[0][label]:
            values = [run[label][in_flight] for run in runs if in_flight in run[label]]
            merged[label][in_flight] = tuple(statistics.median(parts) for parts in zip(*values))
    return merged


def show(form: str, numbers: tuple[float, ...] | None) -> str:
    """Numbers in a row's format; empty if there are none."""
    if numbers is None:
        return ""
    return form.format(*numbers).replace("nan", "-")


def ratio(form: str, numbers: tuple[float, ...] | None, base: tuple[float, ...] | None) -> str:
    """Each number divided by the matching number of ``base``, as ``x1.23``."""
    if numbers is None or base is None:
        return ""
    parts = [f"x{mine / theirs:.2f}" if theirs else "-" for mine, theirs in zip(numbers, base)]
    separator = " / " if " / " in form else ""
    return separator.join(parts).replace("xnan", "-")


def table(figures: dict[str, dict[int, tuple[float, ...]]]) -> list[str]:
    """The figures as a markdown table."""
    many, one = IN_FLIGHT
    lines = [
        f"| figure | default ({many} in flight, batches) | one at a time ({one} in flight) | ratio |",
        "|---|---|---|---|",
    ]
    for row in rows():
        values = figures.get(row.label, {})
        mine, theirs = values.get(many), values.get(one)
        if not row.per_column:
            lines.append(f"| {row.label} | {show(row.form, mine)} | | |")
            continue
        lines.append(
            f"| {row.label} | {show(row.form, mine)} | {show(row.form, theirs)} | {ratio(row.form, mine, theirs)} |"
        )
    return lines


def package_version(name: str) -> str:
    """An installed package's version, or ``?``."""
    try:
        return version(name)
    except PackageNotFoundError:
        return "?"


def header(runs: int, window_s: float, jobs: int, quick: bool = False) -> list[str]:
    """The machine, the versions, and how the figures were measured."""
    load = " ".join(f"{value:.2f}" for value in os.getloadavg())
    warning = [f"{jobs} steps ran at once: these figures are not measurements"] if jobs > 1 else []
    side_by_side = ", ".join(f"{rate:g} Hz x {tasks}" for rate, tasks in OWN_RATE_STEPS)
    return [
        *warning,
        f"machine: {os.cpu_count()} cores, {platform.system()} {platform.machine()}; load average at start {load}",
        f"python {platform.python_version()}, grpcio {grpc.__version__},"
        f" farm-ng-core {package_version('farm-ng-core')}, protobuf {package_version('protobuf')}",
        f"{runs} run(s), medians shown; each step's figures over one interval of about {window_s:g} s, the same for",
        "  all its services (each counter read between its service's /stats, once a second, around the ends).",
        "Agent rates, relay steps, ceiling, CPU, RSS: one agent task -> one supervisor (confidence=0) -> storage",
        "  that never fills, every service at log_level WARNING (the INFO row: the same at INFO, output to a pipe).",
        *(
            [f"  --quick: the agent-rate rows of {side_by_side} ran side by side, each agent with its own supervisor."]
            if quick
            else []
        ),
        "Relay rows: published - stored - lost is how much the backlog grew over the interval (samples on their way",
        "  to the supervisor, queued there or in flight to storage): stored/s a little above published/s is a backlog",
        "  drained within the interval; far below it with few lost, a backlog building up (the supervisor lags).",
        "Latency: service_config.json as it is (log_level INFO): agent publish -> residual back at the agent;",
        "  unstored: samples above confidence the supervisor dropped, could not store or storage refused, plus",
        "  those the agent's server dropped from the supervisor's subscription queue. Ratio: default / one at a time.",
    ]


# ---------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="python -m tools.bench", description="Benchmark the services: rates, latency, relay ceiling, CPU, RSS."
    )
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_WINDOW_S:g} s windows instead of 5 s")
    parser.add_argument("--runs", type=int, default=1, help="runs; the table shows each figure's median")
    # For the test suite: the length of each window, in seconds, and how many steps
    # run at once (their figures then mean nothing).
    parser.add_argument("--seconds", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--jobs", type=int, default=1, help=argparse.SUPPRESS)
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line, checked."""
    parser = build_parser()
    cli = parser.parse_args(argv)
    if cli.runs < 1:
        parser.error("--runs must be at least 1")
    if cli.jobs < 1:
        parser.error("--jobs must be at least 1")
    if cli.seconds is not None and cli.seconds <= 0:
        parser.error("--seconds must be positive")
    return cli


async def run_bench(cli: argparse.Namespace) -> int:
    """Runs the benchmark and prints the table; returns the exit code."""
    window_s = cli.seconds or (QUICK_WINDOW_S if cli.quick else DEFAULT_WINDOW_S)
    for line in header(cli.runs, window_s, cli.jobs, cli.quick):
        print(line, flush=True)
    started = time.monotonic()
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-") as directory:
        for index in range(cli.runs):
            runs.append(await run_once(Path(directory), window_s, cli.jobs, cli.quick))
            print(
                f"run {index + 1}/{cli.runs} done after {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True
            )
    print()
    for line in table(median_figures(runs)):
        print(line)
    print()
    load = " ".join(f"{value:.2f}" for value in os.getloadavg())
    bench_cpu = sum(psutil.Process().cpu_times()[:2])
    print(
        f"took {time.monotonic() - started:.0f} s; load average at end {load}; "
        f"the benchmark itself used {bench_cpu:.1f} CPU s",
        flush=True,
    )
    return 0


async def run_until_signal(cli: argparse.Namespace) -> int:
    """Runs the benchmark; Ctrl-C or SIGTERM cancels it, and its services stop."""
    loop = asyncio.get_running_loop()
    bench = asyncio.ensure_future(run_bench(cli))

    def interrupt() -> None:
        # Once only: a second Ctrl-C must not cut short the stopping of the services.
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, lambda: None)
        bench.cancel()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, interrupt)
    try:
        return await bench
    except asyncio.CancelledError:
        print("interrupted; services stopped", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    """Parses the command line and runs the benchmark."""
    cli = parse_args(argv)
    # The clients' "peer is up" lines are noise here; outages still show.
    logging.getLogger(BENCH_CLIENT).setLevel(logging.WARNING)
    try:
        return asyncio.run(run_until_signal(cli))
    except (BenchError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C before the loop took over signals
        return 130


if __name__ == "__main__":
    sys.exit(main())
