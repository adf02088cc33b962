"""Storage: counts what the supervisors store, up to ``max_storage``, and drains it.

Request/reply ``/update_storage`` (``Empty``) stores one item and replies the residual,
``Int32Value(max_storage - count)``. Every ``drain_period`` seconds (0.1 by default), when
it holds at least ``batch_size``, it removes a batch. It publishes the residual on
``/residual`` (latched) after each drain and at least every ``max(drain_period, 0.5 s)``:
supervisors wake the agents that paused while it was full by it.

    python storage.py --service-config service_config.json --service-name storage
"""

from __future__ import annotations

import propagation.startup  # noqa: F401  (first: before gRPC and farm-ng-core load)

import asyncio
import dataclasses

from farm_ng.core.event_pb2 import Event
from farm_ng.core.event_service import EventServiceGrpc
from farm_ng.core.event_service_pb2 import RequestReplyRequest
from farm_ng.core.timestamp_pb2 import Timestamp
from google.protobuf.empty_pb2 import Empty
from google.protobuf.message import Message
from google.protobuf.struct_pb2 import Struct
from google.protobuf.wrappers_pb2 import Int32Value

from propagation import wire
from propagation.args import arg
from propagation.cli import ServiceSpec, run
from propagation.residuals import DrainTicks, ResidualClock
from propagation.serving import create_server, serve


class Storage:
    """A bounded count: each store adds one, the drain removes batches."""

    def __init__(self, service: EventServiceGrpc, args: StorageArgs) -> None:
        self.service = service
        self.args = args
        self.count = 0
        self.clock = ResidualClock()  # stamps residuals: agents apply the newest
        self.counts = dict.fromkeys(("accepted", "refused", "drained", "bad_batches"), 0)
        # farm-ng-core's publish reads and bumps its sequence around an await.
        self.publishing = asyncio.Lock()
        self.was_full = False
        service.add_request_reply_handler(self.on_request)

    async def on_request(self, request: RequestReplyRequest) -> Message | tuple[Message, Event]:
        """``/update_storage`` stores one item and replies the residual, stamped.

        One parameter: farm-ng-core hands over the raw request (with two it would decode
        by the type the sender names). ``/update_storage_batch`` (``Int32Value`` n)
        stores up to n at once for a supervisor under load and replies a ``Struct``
        ``{"stored", "refused", "residual"}``.
        """
        if request.event.uri.path == "/update_storage":
            stamps = [self.clock.stamp()]
            if self.store(1) == 0:
                stamps.append(Timestamp(semantics=wire.STORE_REFUSED))
            residual = Int32Value(value=self.args.max_storage - self.count)
            await self.publish_level(only_if_full=True)  # the peak: a plot of /level reaches max_storage
            return residual, Event(timestamps=stamps)
        if request.event.uri.path == "/update_storage_batch":
            return await self.store_batch(Int32Value.FromString(request.payload).value)
        return Empty()

    def store(self, items: int) -> int:
        """Stores as many of ``items`` as there is room for; returns how many.

        No await in here: stores from any number of supervisors at once cannot push the
        count past max_storage.
        """
        limit = self.args.max_storage
        stored = min(items, limit - self.count)
        for _ in range(stored):
            self.count += 1
            self.service.logger.info("Storage: %d/%d (%d remaining)", self.count, limit, limit - self.count)
        self.counts["accepted"] += stored
        refused = items - stored
        if refused:  # one line per call, whatever the number refused
            self.counts["refused"] += refused
            what = "store refused" if refused == 1 else f"{refused} stores refused"
            self.service.logger.info("Storage full: %d/%d, %s (%d refused)", limit, limit, what, self.counts["refused"])
        return stored

    async def drain(self) -> None:
        """Removes ``batch_size`` every ``drain_period`` while it holds that much; re-asserts the residual.

        The residual goes out after each drain and at least every ``reassert_period``,
        drained or not: a supervisor that missed one (or a wake-up it sent that was lost)
        has the next within that period.
        """
        ticks = DrainTicks(self.args.drain_period, self.args.batch_size)
        await self.publish_level()
        await self.publish_residual()
        loop = asyncio.get_running_loop()
        deadline = loop.time()
        while True:
            deadline += self.args.drain_period
            await asyncio.sleep(max(0.0, deadline - loop.time()))
            drain, publish = ticks.tick(self.count)
            if drain:
                await self.publish_level()  # the level before the drain: its peak
                self.count -= self.args.batch_size
                self.counts["drained"] += self.args.batch_size
                self.service.logger.info("Removed from storage: %d/%d", self.args.batch_size, self.args.max_storage)
                await self.publish_level()
            if publish:
                await self.publish_residual()

    async def publish_residual(self) -> None:
        """Publishes the residual on ``/residual``, latched: a late subscriber gets it at once."""
        residual = Int32Value(value=self.args.max_storage - self.count)
        async with self.publishing:
            await self.service.publish("/residual", residual, [self.clock.stamp()], latch=True)

    async def publish_level(self, only_if_full: bool = False) -> None:
        """Publishes the count on ``/level`` (latched) where it peaks: before and after each drain, and when full.

        ``/stats`` comes once a second and ``/residual`` with the drains: a plot of either
        never shows how full storage got. With ``only_if_full``, only when it just got full.
        """
        full = self.count == self.args.max_storage
        if only_if_full and (not full or self.was_full):
            return
        self.was_full = full
        level = Struct()
        level.update({"count": self.count, "max_storage": self.args.max_storage})
        async with self.publishing:
            await self.service.publish("/level", level, latch=True)

    async def store_batch(self, wanted: int) -> Message | tuple[Message, Event]:
        """Stores up to ``wanted`` items (``/update_storage_batch``).

        The server's guard refuses a count off ``1..wire.MAX_BATCH`` with a status first;
        one that got here anyway (a guard changed) gets ``Empty``, counted.
        """
        if not 1 <= wanted <= wire.MAX_BATCH:
            self.counts["bad_batches"] += 1
            return Empty()
        stamp = self.clock.stamp()
        stored = self.store(wanted)
        reply = Struct()
        reply.update({"stored": stored, "refused": wanted - stored, "residual": self.args.max_storage - self.count})
        await self.publish_level(only_if_full=True)
        return reply, Event(timestamps=[stamp])

    def stats(self) -> dict[str, object]:
        """The figures ``/stats`` carries."""
        return {"count": self.count, "max_storage": self.args.max_storage, **self.counts}


@dataclasses.dataclass(frozen=True)
class StorageArgs:
    """The ``args`` of a storage entry in the config."""

    max_storage: int = arg(1, wire.INT32_MAX)
    batch_size: int = arg(1, wire.INT32_MAX)
    drain_period: float = arg(0.01, 60, default=0.1, unit="s")

    def __post_init__(self) -> None:
        if self.batch_size > self.max_storage:
            msg = f"arg batch_size={self.batch_size} must be in 1..max_storage ({self.max_storage})"
            raise ValueError(msg)


async def main(spec: ServiceSpec[StorageArgs]) -> int:
    """Builds the storage service and serves it until Ctrl-C or SIGTERM."""
    service = EventServiceGrpc(create_server(wire.STORAGE, spec.entries), spec.config)
    storage = Storage(service, spec.args)
    return await serve(service, [storage.drain()], stats=storage.stats)


if __name__ == "__main__":
    run(__doc__, StorageArgs, main)
