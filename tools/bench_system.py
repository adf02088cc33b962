"""The benchmark's system under test (``Service``, ``System``), its measurement ``Window``, and the ``floor``.

How a window is measured, and what the floor is: docs/benchmark.md.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Sequence

import grpc
import psutil
from farm_ng.core.event_pb2 import Event
from farm_ng.core.event_service import EventServiceGrpc
from farm_ng.core.event_service_pb2 import EventServiceConfig, RequestReplyRequest, SubscribeRequest
from farm_ng.core.event_service_pb2_grpc import EventServiceStub
from farm_ng.core.uri import make_proto_uri
from farm_ng.core.uri_pb2 import Uri
from google.protobuf.empty_pb2 import Empty
from google.protobuf.struct_pb2 import Struct

from propagation.config import Entry, read_config, role_of
from propagation.peers import PeerClient
from tools import processes
from tools.figures import number, sent_at

# The name the benchmark's clients give themselves, and their logger's.
BENCH_CLIENT = "bench"
# Services publish /stats every second: a bound that only a hang reaches on a loaded machine.
STATS_TIMEOUT_S = 60.0
# A service publishes /health a moment (milliseconds) before /stats on each beat:
# a /health this much before a /stats is of the same beat.
HEALTH_SLACK_S = 0.1
OUTPUT_TAIL_BYTES = 3000


class BenchError(Exception):
    """A service did not start, died, or stopped publishing its figures."""


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """One ``/stats`` (or ``/health``) of a service, with its process's resources as it came."""

    stamp: float  # when the service sent it, on its monotonic clock (the same as time.monotonic() here)
    figures: dict[str, Any]
    cpu_s: float = 0.0
    rss_bytes: int = 0


class Service:
    """A service's process, the end of its output, and its ``/stats`` and ``/health``."""

    def __init__(self, entry: Entry, process: asyncio.subprocess.Process) -> None:
        self.name = entry.name
        self.role = role_of(entry)
        self.process = process
        self.stats: list[Snapshot] = []
        self.health: list[Snapshot] = []
        self.stopped_in = math.inf  # seconds from SIGTERM to its exit; inf if killed
        self._resources = psutil.Process(process.pid)
        self._tail = b""
        self._changed = asyncio.Condition()
        self._client = PeerClient(entry.service_config(), BENCH_CLIENT)
        self._output = asyncio.ensure_future(self._read_output())
        self._watchers = [asyncio.ensure_future(self._watch(path)) for path in ("/stats", "/health")]

    async def serving(self) -> None:
        """Waits until it serves: its first ``/stats`` comes (at WARNING it prints no "serving on").

        Raises:
            BenchError: it exited, or published nothing within ``READY_TIMEOUT_S``.
        """
        served = asyncio.ensure_future(self.until(lambda: bool(self.stats), "/stats"))
        exited = asyncio.ensure_future(self.process.wait())
        await asyncio.wait([served, exited], timeout=processes.READY_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED)
        for waiting in (served, exited):
            waiting.cancel()
        if not self.stats:
            await asyncio.wait([self._output], timeout=1.0)  # the last words of a dying service
            how = "exited" if self.process.returncode is not None else "published no /stats"
            msg = f"{self.name} {how}:\n{self.output_tail()}"
            raise BenchError(msg)

    async def _read_output(self) -> None:
        """Reads the output in chunks, keeping only its end: cheap even at INFO."""
        assert self.process.stdout is not None
        while chunk := await self.process.stdout.read(65536):
            self._tail = (self._tail + chunk)[-OUTPUT_TAIL_BYTES:]

    def output_tail(self) -> str:
        """The end of what it printed."""
        return self._tail.decode(errors="replace").rstrip()

    async def _watch(self, path: str) -> None:
        snapshots = self.stats if path == "/stats" else self.health
        request = SubscribeRequest(uri=Uri(path=path, query=f"service_name={self.name}"), every_n=1)
        async for event, message in self._client.subscribe(request, decode=True):
            if not isinstance(message, Struct):
                continue
            try:
                times, memory = self._resources.cpu_times(), self._resources.memory_info()
            except psutil.Error:  # it exited: its figures end here
                return
            stamp = sent_at(event) or time.monotonic()  # not stamped: its arrival is the next best
            snapshots.append(Snapshot(stamp, dict(message), times.user + times.system, memory.rss))
            async with self._changed:
                self._changed.notify_all()

    async def read_sequences(self, sequences: list[int]) -> None:
        """Adds the sequence number of each event of its ``/sample`` to ``sequences`` (raw payloads: cheap)."""
        request = SubscribeRequest(uri=Uri(path="/sample", query=f"service_name={self.name}"), every_n=1)
        async for event, _ in self._client.subscribe(request, decode=False):
            sequences.append(event.sequence)

    async def until(self, condition: Callable[[], bool], what: str) -> None:
        """Waits until ``condition()`` holds after a ``/stats`` or ``/health``.

        Raises:
            BenchError: it did not within ``STATS_TIMEOUT_S`` (``what`` names what was awaited).
        """
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(condition), STATS_TIMEOUT_S)
            except asyncio.TimeoutError:
                msg = f"{self.name} published no {what} within {STATS_TIMEOUT_S:g} s:\n{self.output_tail()}"
                raise BenchError(msg) from None

    async def stop(self) -> None:
        """Stops watching, then SIGTERM, and SIGKILL if it does not exit in time; notes how long it took."""
        for watcher in self._watchers:
            watcher.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)
        await self._client.close()
        asked = time.monotonic()
        running = self.process.returncode is None
        await processes.stop([self.process])
        if running and self.process.returncode == 0:
            self.stopped_in = time.monotonic() - asked
        await asyncio.wait([self._output], timeout=1.0)
        self._output.cancel()


class System:
    """One step's services, on free ports (none twice: systems run side by side), started and stopped together."""

    def __init__(self, path: Path, entries: list[dict[str, Any]], given_ports: set[int]) -> None:
        ports = processes.free_ports(len(entries), given_ports)
        given_ports.update(ports)
        self.path = path
        self.entries = [dict(entry, port=port) for entry, port in zip(entries, ports)]
        self.services: dict[str, Service] = {}

    async def start(self) -> None:
        """Starts every service at once (any order works) and waits until all serve.

        Those started are in ``services`` even if this fails or is cancelled: ``stop`` stops them.

        Raises:
            BenchError: a service exited, or published nothing within ``READY_TIMEOUT_S``.

        """
        self.path.write_text(json.dumps({"configs": self.entries}, indent=2))
        for entry in read_config(str(self.path)):
            process = await processes.spawn(processes.service_argv(self.path, entry))
            self.services[entry.name] = Service(entry, process)
        waiting = [asyncio.ensure_future(service.serving()) for service in self.services.values()]
        try:
            await asyncio.gather(*waiting)
        finally:
            for task in waiting:  # after a failure, the others end too
                task.cancel()

    async def stop(self) -> list[Service]:
        """Stops every service at once; returns them, stopped."""
        services, self.services = list(self.services.values()), {}
        await asyncio.gather(*(service.stop() for service in services))
        return services


@dataclasses.dataclass(frozen=True)
class Window:
    """One measurement interval, common to every service, and each service's figures around it.

    A counter's value at either end is read between its service's two snapshots around that moment (``at``).
    """

    opens: float  # the services' monotonic clock (one host)
    closes: float
    stats: dict[str, list[Snapshot]]
    health: dict[str, list[Snapshot]]

    def seconds(self) -> float:
        """The length of the interval."""
        return self.closes - self.opens

    def rate(self, snapshots: Sequence[Snapshot], value: Callable[[Snapshot], float], slack: float = 0.0) -> float:
        """How fast ``value`` of the snapshots grew over the interval, per second."""
        points = [(shot.stamp, value(shot)) for shot in snapshots]
        return (at(points, self.closes, slack) - at(points, self.opens, slack)) / self.seconds()

    def per_second(self, name: str, *keys: str) -> float:
        """How fast the sum of ``name``'s ``/stats`` counters ``keys`` grew (NaN if one is not a number)."""
        return sum(self.rate(self.stats[name], lambda shot, key=key: counter(shot, key)) for key in keys)

    def health_per_second(self, name: str, key: str) -> float:
        """How fast one of ``name``'s ``/health`` counters grew."""
        return self.rate(self.health[name], lambda shot: counter(shot, key), HEALTH_SLACK_S)

    def cpu_share(self, name: str) -> float:
        """CPU seconds ``name``'s process used per second of the interval."""
        return self.rate(self.stats[name], lambda shot: shot.cpu_s)

    def end(self, name: str) -> Snapshot:
        """``name``'s first ``/stats`` at or after the interval closed."""
        return next(snapshot for snapshot in self.stats[name] if snapshot.stamp >= self.closes)

    def figure(self, name: str, key: str) -> float:
        """One of ``name``'s figures at the end of the interval (NaN if it has none)."""
        value = number(self.end(name).figures, key)
        return math.nan if value is None else value


def counter(snapshot: Snapshot, key: str) -> float:
    """A counter of a snapshot: 0 before the service counts it, NaN if it is not a number."""
    return number(snapshot.figures, key) or 0.0


def at(points: Sequence[tuple[float, float]], moment: float, slack: float = 0.0) -> float:
    """A value at ``moment``, between the ``(stamp, value)`` points around it (or the last, up to ``slack`` before)."""
    before = max((point for point in points if point[0] <= moment), key=lambda point: point[0])
    after = min((point for point in points if point[0] >= moment), key=lambda point: point[0], default=None)
    if after is None and moment - before[0] > slack:
        msg = f"no figures after {moment:.3f} (the last at {before[0]:.3f})"
        raise BenchError(msg)
    if after is None or after[0] == before[0]:
        return before[1]
    return before[1] + (moment - before[0]) / (after[0] - before[0]) * (after[1] - before[1])


async def measure(system: System, window_s: float) -> Window:
    """Measures every service of ``system`` over a little less than ``window_s``, once samples flow through all.

    The interval opens at the later of the last service's first ``/stats`` with samples through it and
    the first ``/health`` of each (not latched: it may come late on a busy machine); it closes once
    every service has sent a ``/stats`` about ``window_s`` later.
    """
    services = list(system.services.values())
    for service in services:
        await service.until(lambda service=service: any(map(is_flowing, service.stats)), "samples flowing")
        await service.until(lambda service=service: bool(service.health), "/health")
    starts = [next(shot.stamp for shot in service.stats if is_flowing(shot)) for service in services]
    opens = max(*starts, *(service.health[0].stamp for service in services))
    # A little short of window_s: /stats come every second plus the time to publish, and
    # the other services' beats a fraction of a second before or after.
    wanted = opens + window_s - min(0.5, window_s / 2)
    for service in services:
        await service.until(lambda service=service: service.stats[-1].stamp >= max(wanted, opens + 1e-6), "/stats")
    closes = min(next(shot.stamp for shot in service.stats if shot.stamp >= wanted) for service in services)
    for service in services:
        await service.until(lambda service=service: service.health[-1].stamp >= closes - HEALTH_SLACK_S, "/health")
    stats = {service.name: list(service.stats) for service in services}
    return Window(opens, closes, stats, {service.name: list(service.health) for service in services})


def is_flowing(snapshot: Snapshot) -> bool:
    """Whether samples have gone through a service: relayed back to an agent, stored, or accepted."""
    key = next((key for key in ("residuals", "stored", "accepted") if key in snapshot.figures), "accepted")
    return counter(snapshot, key) > 0


async def floor(seconds: float) -> tuple[float, float]:
    """CPU ms of one bare farm-ng-core ``requestReply`` and of one subscribed event, both ends here, no step beside."""
    server = grpc.aio.server()
    port = server.add_insecure_port("localhost:0")  # a free one: bound at once
    service = EventServiceGrpc(server, EventServiceConfig(name="floor", host="localhost", port=port))

    async def reply(_request: RequestReplyRequest) -> Empty:
        return Empty()

    service.add_request_reply_handler(reply)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"localhost:{port}") as channel:
            stub = EventServiceStub(channel)
            request = RequestReplyRequest(event=Event(uri=make_proto_uri(path="/floor", message=Empty())))
            call_ms = await cpu_ms_each(lambda: stub.requestReply(request), seconds)
            stream = stub.subscribe(SubscribeRequest(uri=Uri(path="/floor", query="service_name=floor"), every_n=1))
            while (await service.publish("/floor", Empty())).number_clients == 0:  # until it subscribed
                await asyncio.sleep(0.01)
            await stream.read()

            async def event() -> None:
                await service.publish("/floor", Empty())
                await stream.read()

            event_ms = await cpu_ms_each(event, seconds)
            stream.cancel()
    finally:
        await server.stop(0)
    return call_ms, event_ms


async def cpu_ms_each(job: Callable[[], Awaitable[Any]], seconds: float) -> float:
    """The CPU ms this process spends per run of ``job``, run one at a time for about ``seconds``."""
    for _ in range(20):  # warm up: channels, caches
        await job()
    runs, cpu, ends = 0, time.process_time(), time.monotonic() + seconds
    while time.monotonic() < ends:
        await job()
        runs += 1
    return 1000 * (time.process_time() - cpu) / runs
