"""Agent: ``num_tasks`` tasks publish samples on ``/sample``, each at ``rate`` Hz.

Each sample is a ``Struct`` ``{"sample": <random in [0, 1)>, "task_id": <task>}``.
Request/reply ``/update_residual`` (``Int32Value``) tells the agent how much room is
left in storage: while that remainder is ``<= 0`` no task publishes. Before the first
update the agent publishes freely.

    python agent.py --service-config service_config.json --service-name agent-1
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import sys
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Awaitable

from farm_ng.core.uri import get_host_name
from google.protobuf.empty_pb2 import Empty
from google.protobuf.struct_pb2 import Struct
from google.protobuf.wrappers_pb2 import Int32Value

from service_runtime import RESIDUAL_TIME, SAMPLE_PUBLISHED, find_stamp, is_newer, publish_every, require, run_service

if TYPE_CHECKING:
    from farm_ng.core.event_pb2 import Event
    from farm_ng.core.event_service import EventServiceGrpc
    from farm_ng.core.timestamp_pb2 import Timestamp
    from google.protobuf.message import Message

    from service_runtime import ServiceSpec

# A task that falls behind its schedule catches up by publishing at once, up to this
# much lag; beyond it the missed slots are skipped and counted.
MAX_CATCH_UP_S = 0.1
# Propagation latencies kept for /stats percentiles, and how far back they reach.
LATENCY_WINDOW_S = 5.0


@dataclasses.dataclass(frozen=True)
class AgentArgs:
    """The ``args`` of an agent entry in the config."""

    rate: float
    num_tasks: int

    def __post_init__(self) -> None:
        require(self.rate > 0, "rate", self.rate, "> 0")
        require(self.num_tasks > 0, "num_tasks", self.num_tasks, "> 0")


class Agent:
    """Publishes samples on a fixed schedule while storage has room."""

    def __init__(self, service: EventServiceGrpc, args: AgentArgs) -> None:
        self._service = service
        self._args = args
        self._clock = f"{get_host_name()}/monotonic"
        # farm-ng-core numbers events by reading its counter, awaiting, then writing
        # it back: concurrent publishes would share numbers.
        self._publish_lock = asyncio.Lock()
        self._may_publish = asyncio.Event()
        self._may_publish.set()
        self.remainder: int | None = None
        self._residual_time: Timestamp | None = None
        self.published = 0
        self.missed_slots = 0
        self.residuals = 0
        self.stale_residuals = 0
        self.resumes = 0
        # Seconds from storage's drain to this agent resuming, when both share a clock.
        self.resume_delays: deque[float] = deque(maxlen=100)
        self._latencies: deque[tuple[float, float]] = deque(maxlen=10_000)
        self._warned_slow = False
        service.add_request_reply_handler(self.on_request)

    async def on_request(self, event: Event, message: Message) -> Message:
        """Handles ``/update_residual``: the residual becomes the remainder."""
        if event.uri.path != "/update_residual":
            return Empty()
        if not isinstance(message, Int32Value):
            self._service.logger.warning("ignored /update_residual carrying %s", type(message).__name__)
            return Empty()
        if self._is_stale(event):
            self.stale_residuals += 1
            return Empty()
        self.residuals += 1
        self.remainder = message.value
        self._service.logger.info("Remainder: %d", self.remainder)
        if self.remainder <= 0:
            self._may_publish.clear()
        elif not self._may_publish.is_set():
            self._may_publish.set()
            self._note_resume(event)
        self._note_latency(event)
        return Empty()

    def _is_stale(self, event: Event) -> bool:
        """Whether a residual is older than the one applied last.

        Residuals reach the agent by several routes (a relay per sample, a broadcast
        after each drain) and can overtake each other; storage stamps each with the
        time it was true. A residual without the stamp (from farm-ng's original
        supervisor) is always applied.
        """
        stamp = find_stamp(event, RESIDUAL_TIME)
        if stamp is None:
            return False
        if not is_newer(stamp, self._residual_time):
            return True
        self._residual_time = stamp
        return False

    def _note_resume(self, event: Event) -> None:
        """Records how long after storage made room this agent resumed."""
        self.resumes += 1
        made_room = find_stamp(event, RESIDUAL_TIME)
        if made_room is not None and made_room.clock_name == self._clock:
            self.resume_delays.append(time.monotonic() - made_room.stamp)

    def _note_latency(self, event: Event) -> None:
        """Records how long ago the sample behind this residual was published."""
        published = find_stamp(event, SAMPLE_PUBLISHED)
        if published is not None and published.clock_name == self._clock:
            now = time.monotonic()
            self._latencies.append((now, now - published.stamp))

    async def run_task(self, task_id: int) -> None:
        """Publishes a sample every ``1/rate`` s, aiming at absolute deadlines.

        Sleeping ``1/rate`` after each publish would add the publish time and the
        sleep's overshoot to every period and run slow.
        """
        loop = asyncio.get_running_loop()
        period = 1.0 / self._args.rate
        # Tasks take turns within each period: started together, they would publish in
        # bursts of num_tasks, and each sample of a burst would wait for the others.
        offset = period * task_id / self._args.num_tasks
        deadline = loop.time() + offset
        while True:
            await asyncio.sleep(max(0.0, deadline - loop.time()))
            if not self._may_publish.is_set():
                await self._may_publish.wait()
                deadline = loop.time() + offset  # a new schedule from the resume on
                continue
            lag = loop.time() - deadline
            skipped = int(lag / period) if lag > MAX_CATCH_UP_S else 0
            if skipped:
                self.missed_slots += skipped
                deadline += skipped * period
                self._warn_slow()
            await self.publish_sample(task_id)
            deadline += period

    async def publish_sample(self, task_id: int) -> None:
        """Publishes one sample on ``/sample``."""
        message = Struct()
        message["sample"] = random.random()
        message["task_id"] = task_id
        async with self._publish_lock:
            await self._service.publish("/sample", message)
        self.published += 1
        self._service.logger.info("Published sample %s from task %d", message["sample"], task_id)

    def _warn_slow(self) -> None:
        if self._warned_slow:
            return
        self._warned_slow = True
        wanted = self._args.rate * self._args.num_tasks
        achieved = wanted * self.published / (self.published + self.missed_slots)
        self._service.logger.warning(
            "cannot keep up with rate=%g x num_tasks=%d: %.0f samples/s of %g so far; "
            "skipping missed slots (counted in /stats missed_slots)",
            self._args.rate,
            self._args.num_tasks,
            achieved,
            wanted,
        )

    def stats(self) -> dict[str, Any]:
        """The figures ``/stats`` carries."""
        now = time.monotonic()
        while self._latencies and self._latencies[0][0] < now - LATENCY_WINDOW_S:
            self._latencies.popleft()
        latencies = sorted(latency for _, latency in self._latencies)
        figures: dict[str, Any] = {
            "rate": self._args.rate,
            "num_tasks": self._args.num_tasks,
            "published": self.published,
            "missed_slots": self.missed_slots,
            "paused": not self._may_publish.is_set(),
            "residuals": self.residuals,
            "stale_residuals": self.stale_residuals,
            "resumes": self.resumes,
        }
        if self.resume_delays:
            figures["resume_last_ms"] = 1000 * self.resume_delays[-1]
            figures["resume_max_ms"] = 1000 * max(self.resume_delays)
        if self.remainder is not None:
            figures["remainder"] = self.remainder
        if latencies:
            figures["latency_p50_ms"] = 1000 * percentile(latencies, 0.50)
            figures["latency_p90_ms"] = 1000 * percentile(latencies, 0.90)
            figures["latency_p99_ms"] = 1000 * percentile(latencies, 0.99)
            figures["latency_count"] = len(latencies)
        return figures


def percentile(ordered: list[float], fraction: float) -> float:
    """The value below which ``fraction`` of ``ordered`` (sorted, non-empty) lies."""
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def start(service: EventServiceGrpc, _spec: ServiceSpec, args: AgentArgs) -> list[Awaitable[Any]]:
    """Builds the agent and returns what it runs beside the server."""
    agent = Agent(service, args)
    tasks: list[Awaitable[Any]] = [agent.run_task(task_id) for task_id in range(args.num_tasks)]
    return [*tasks, publish_every(service, "/stats", agent.stats)]


if __name__ == "__main__":
    sys.exit(run_service("An agent of farm-ng-core's service propagation example.", AgentArgs, start))
