"""Agent: ``num_tasks`` tasks publish samples on ``/sample``, each at ``rate`` Hz.

Each sample is a ``Struct`` ``{"sample": <random in [0, 1)>, "task_id": <task>}``.
Request/reply ``/update_residual`` (``Int32Value``) tells the agent how much room is left
in storage, its remainder: while that is ``<= 0`` no task publishes. Before the first
update the agent publishes freely.

    python agent.py --service-config service_config.json --service-name agent-1
"""

from __future__ import annotations

import propagation.startup  # noqa: F401  (first: before gRPC and farm-ng-core load)

import asyncio
import contextlib
import dataclasses
import random
import time

from farm_ng.core.event_pb2 import Event
from farm_ng.core.event_service import EventServiceGrpc
from farm_ng.core.event_service_pb2 import RequestReplyRequest
from google.protobuf.empty_pb2 import Empty
from google.protobuf.struct_pb2 import Struct
from google.protobuf.wrappers_pb2 import Int32Value

from propagation import wire
from propagation.args import arg
from propagation.cli import ServiceSpec, run
from propagation.pacing import Pacer
from propagation.residuals import PAUSES_MIN_GAP_S, PAUSES_PERIOD_S, ResidualFilter
from propagation.serving import create_server, serve
from propagation.stats import AgentCounts


class Agent:
    """Publishes samples while storage has room; hears the room left on ``/update_residual``."""

    def __init__(self, service: EventServiceGrpc, args: AgentArgs) -> None:
        self.service = service
        service.add_request_reply_handler(self.on_request)
        self.pacer = Pacer(args.rate, args.num_tasks, on_slow=self.warn_slow)
        # farm-ng-core numbers events by reading its counter, awaiting, then writing it
        # back: concurrent publishes would share numbers.
        self.publishing = asyncio.Lock()
        self.remainder: int | None = None
        self.residuals = ResidualFilter()
        self.counts = AgentCounts(args.rate, args.num_tasks, self.residuals.local_clock)
        self.pause_changed = asyncio.Event()

    async def on_request(self, request: RequestReplyRequest) -> Empty:
        """``/update_residual``: the residual storage had left becomes the remainder.

        One parameter, so farm-ng-core hands over the raw request: with two it would
        decode the payload by the type the sender names, importing the module that
        names. The server's guard lets through only an ``Int32Value`` on this path.
        """
        if request.event.uri.path == "/update_residual":
            residual = Int32Value.FromString(request.payload)
            verdict = self.residuals.verdict(wire.find_stamp(request.event, wire.RESIDUAL_TIME), time.monotonic())
            self.counts.residual(verdict, request.event)
            if verdict == "apply":
                self.remainder = residual.value
                self.service.logger.info("Remainder: %d", residual.value)
                self.pause_or_resume(request.event)
        return Empty()

    async def run_task(self, task_id: int) -> None:
        """Publishes a sample on ``/sample`` in each of this task's slots, while there is room."""
        async for _ in self.pacer.slots(task_id):
            message = Struct()
            message["sample"] = random.random()
            message["task_id"] = task_id
            async with self.publishing:
                await self.service.publish("/sample", message)
            self.counts.published += 1
            self.service.logger.info("Published sample %s from task %d", message["sample"], task_id)

    def pause_or_resume(self, event: Event) -> None:
        """Pauses the tasks at a remainder ``<= 0``, resumes them above."""
        has_room = self.remainder is None or self.remainder > 0
        if has_room == self.pacer.room.is_set():
            return
        if has_room:
            self.pacer.room.set()
            self.counts.resumed(event)
        else:
            self.pacer.room.clear()
            self.counts.paused()
        self.pause_changed.set()

    async def report_pauses(self) -> None:
        """Publishes whether the agent is paused on ``/pauses`` (latched), at each change and every second."""
        while True:
            self.pause_changed.clear()
            figures = self.counts.pause_figures(paused=not self.pacer.room.is_set())
            async with self.publishing:
                await self.service.publish("/pauses", figures, latch=True)
            await asyncio.sleep(PAUSES_MIN_GAP_S)  # a flood of residuals is not a flood of /pauses
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.pause_changed.wait(), PAUSES_PERIOD_S - PAUSES_MIN_GAP_S)

    def warn_slow(self) -> None:
        """Says once that the tasks cannot keep up; the skipped slots are counted."""
        if not self.counts.warned_slow:
            self.counts.warned_slow = True
            self.service.logger.warning(
                "cannot keep up with rate x num_tasks: skipping missed slots (counted in /stats missed_slots)"
            )

    def stats(self) -> dict[str, object]:
        """The figures ``/stats`` carries."""
        figures = {
            **self.counts.figures(),
            "missed_slots": self.pacer.missed_slots,
            "paused": not self.pacer.room.is_set(),
        }
        if self.remainder is not None:
            figures["remainder"] = self.remainder
        return figures


@dataclasses.dataclass(frozen=True)
class AgentArgs:
    """The ``args`` of an agent entry in the config."""

    rate: float = arg(0.01, 10_000, unit="Hz")  # samples a second, per task
    num_tasks: int = arg(1, 1_000)

    def __post_init__(self) -> None:
        if self.rate * self.num_tasks > 10_000:
            msg = f"arg rate x num_tasks = {self.rate * self.num_tasks:g} must be at most 10000 samples a second"
            raise ValueError(msg)


async def main(spec: ServiceSpec[AgentArgs]) -> int:
    """Builds the agent's service and serves it until Ctrl-C or SIGTERM."""
    service = EventServiceGrpc(create_server(wire.AGENT, spec.entries), spec.config)
    agent = Agent(service, spec.args)
    tasks = [agent.run_task(task_id) for task_id in range(spec.args.num_tasks)]
    return await serve(service, [*tasks, agent.report_pauses()], stats=agent.stats)


if __name__ == "__main__":
    run(__doc__, AgentArgs, main)
