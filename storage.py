"""Storage: counts what the supervisors store, up to ``max_storage``, and drains it.

Request/reply ``/update_storage`` (``Empty``) stores one item and replies the residual,
``Int32Value(max_storage - count)``. ``/update_storage_batch`` (``Int32Value(n)``) stores
n at once, for a supervisor under load, and replies a ``Struct`` ``{"stored", "refused",
"residual"}``. Every 0.1 s, when it holds at least ``batch_size``,
it removes a batch. After each drain it publishes the residual on ``/residual``
(latched), so that supervisors can wake agents that paused while storage was full.

    python storage.py --service-config service_config.json --service-name storage
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys
from typing import TYPE_CHECKING, Any, Awaitable

from farm_ng.core.event_pb2 import Event
from google.protobuf.empty_pb2 import Empty
from google.protobuf.struct_pb2 import Struct
from google.protobuf.wrappers_pb2 import Int32Value

from service_runtime import RESIDUAL_TIME, STORE_REFUSED, publish_every, require, run_service, stamp_now

if TYPE_CHECKING:
    from farm_ng.core.event_service import EventServiceGrpc
    from google.protobuf.message import Message

    from service_runtime import ServiceSpec

DRAIN_PERIOD_S = 0.1


@dataclasses.dataclass(frozen=True)
class StorageArgs:
    """The ``args`` of a storage entry in the config."""

    max_storage: int
    batch_size: int

    def __post_init__(self) -> None:
        require(self.max_storage > 0, "max_storage", self.max_storage, "> 0")
        require(
            1 <= self.batch_size <= self.max_storage,
            "batch_size",
            self.batch_size,
            f"in 1..max_storage ({self.max_storage})",
        )


class Storage:
    """A bounded count: stores add one, the drain removes batches."""

    def __init__(self, service: EventServiceGrpc, args: StorageArgs) -> None:
        self._service = service
        self._max = args.max_storage
        self._batch = args.batch_size
        self.count = 0
        self.accepted = 0
        self.refused = 0
        self.drained = 0
        service.add_request_reply_handler(self.on_request)

    async def on_request(self, event: Event, message: Message) -> Message | tuple[Message, Event]:
        """Handles ``/update_storage`` and ``/update_storage_batch``; other paths get ``Empty``.

        ``Empty`` is what farm-ng's example replies to a path it does not know: a
        supervisor that asks for batches learns so that this storage has none.
        """
        if event.uri.path == "/update_storage":
            refused = self.store(1) == 0
            reply_event = Event(timestamps=[stamp_now(RESIDUAL_TIME)])
            if refused:
                reply_event.timestamps.append(stamp_now(STORE_REFUSED))
            return Int32Value(value=self._max - self.count), reply_event
        if event.uri.path == "/update_storage_batch" and isinstance(message, Int32Value) and message.value > 0:
            stored = self.store(message.value)
            reply = Struct()
            reply.update({"stored": stored, "refused": message.value - stored, "residual": self._max - self.count})
            return reply, Event(timestamps=[stamp_now(RESIDUAL_TIME)])
        return Empty()

    def store(self, items: int) -> int:
        """Stores as many of ``items`` as there is room for; returns how many.

        No await here: stores from any number of supervisors at once cannot push the
        count past max_storage.
        """
        stored = min(items, self._max - self.count)
        for _ in range(stored):
            self.count += 1
            self._service.logger.info("Storage: %d/%d (%d remaining)", self.count, self._max, self._max - self.count)
        self.accepted += stored
        refused = items - stored
        if refused:
            # One line per call: a batch of any size costs one line, not one per item.
            self.refused += refused
            what = "store refused" if refused == 1 else f"{refused} stores refused"
            self._service.logger.info("Storage full: %d/%d, %s (%d refused)", self.count, self._max, what, self.refused)
        return stored

    async def drain(self) -> None:
        """Removes ``batch_size`` every 0.1 s while at least that much is stored."""
        await self.publish_residual()
        loop = asyncio.get_running_loop()
        deadline = loop.time()
        while True:
            deadline += DRAIN_PERIOD_S
            await asyncio.sleep(max(0.0, deadline - loop.time()))
            if self.count < self._batch:
                continue
            self.count -= self._batch
            self.drained += self._batch
            self._service.logger.info("Removed from storage: %d/%d", self._batch, self._max)
            await self.publish_residual()

    async def publish_residual(self) -> None:
        """Publishes the residual, latched so that a late subscriber gets it at once."""
        await self._service.publish(
            "/residual",
            Int32Value(value=self._max - self.count),
            timestamps=[stamp_now(RESIDUAL_TIME)],
            latch=True,
        )

    def stats(self) -> dict[str, Any]:
        """The figures ``/stats`` carries."""
        return {
            "count": self.count,
            "max_storage": self._max,
            "accepted": self.accepted,
            "refused": self.refused,
            "drained": self.drained,
        }


def start(service: EventServiceGrpc, _spec: ServiceSpec, args: StorageArgs) -> list[Awaitable[Any]]:
    """Builds the storage and returns what it runs beside the server."""
    storage = Storage(service, args)
    return [storage.drain(), publish_every(service, "/stats", storage.stats)]


if __name__ == "__main__":
    sys.exit(run_service("The storage of farm-ng-core's service propagation example.", StorageArgs, start))
