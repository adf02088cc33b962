"""A supervisor's machinery around its round trip: the queue, batches, freshness, wake-ups.

- ``Relays``: samples above confidence wait in a bounded queue for one of
  ``max_in_flight`` relays. Under light load a relay takes one sample (the round trip of
  ``Supervisor.relay``); when samples queue up it takes up to ``max_batch`` and stores
  them in one ``/update_storage_batch`` call, far cheaper than one call each. A full
  queue means the supervisor is overloaded: the sample is counted as dropped, since a
  longer queue would only make the residuals it relays older.
- ``Freshness``: a sample that spent too long on the way (a thin link) is not relayed.
- ``AgentLink``: what the supervisor last told an agent, to know whom a drain must wake.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Coroutine

from farm_ng.core.stamp import StampSemantics
from google.protobuf.struct_pb2 import Struct
from google.protobuf.wrappers_pb2 import Int32Value

from propagation import wire
from propagation.config import is_loopback
from propagation.peers import PeerUnavailable

if TYPE_CHECKING:
    from farm_ng.core.event_pb2 import Event
    from farm_ng.core.event_service_pb2 import SubscribeRequest
    from farm_ng.core.timestamp_pb2 import Timestamp

    from propagation.peers import PeerClient

__all__ = ["MAX_PENDING", "AgentLink", "Freshness", "Relays", "batch_residuals", "batch_result"]

# Samples waiting for a free relay slot.
MAX_PENDING = 64


class AgentLink:
    """One supervised agent: its client, its subscription, what it was last told."""

    # An agent that sent no sample for this long may have paused: a drain wakes it
    # whatever it was last told.
    SILENT_S = 0.5

    def __init__(self, agent: PeerClient, subscription: SubscribeRequest) -> None:
        self.agent = agent
        self.subscription = subscription
        self.name = agent.config.name
        # The residual it was last sent and storage's stamp on it; None when unknown.
        self.residual: int | None = None
        self.residual_time: Timestamp | None = None
        self.last_sample = time.monotonic()

    def heard_from(self) -> None:
        """A sample of this agent arrived."""
        self.last_sample = time.monotonic()

    def told(self, residual: int, stamps: list[Timestamp]) -> None:
        """Records a residual before it goes out.

        A drain that arrives while a 0 is on its way must see that the agent is about to
        pause, and wake it.
        """
        stamp = next((stamp for stamp in stamps if stamp.semantics == wire.RESIDUAL_TIME), None)
        if wire.is_newer(stamp, self.residual_time):
            self.residual, self.residual_time = residual, stamp

    def forget(self) -> None:
        """The agent may have missed anything: treat it as unknown."""
        self.residual = self.residual_time = None

    def may_be_paused(self) -> bool:
        """Told ``<= 0``, never reached, or silent for a while: a drain should wake it."""
        return self.residual is None or self.residual <= 0 or time.monotonic() - self.last_sample > self.SILENT_S


class Freshness:
    """Whether a sample is too old to relay, by its delay above the best recently seen.

    The agent stamps a sample when it sends it (its host's monotonic clock); the client
    stamps it when it arrives (this host's). Across hosts the two clocks differ by an
    unknown offset, so the delay itself means nothing; the smallest delay of the last
    ``WINDOW_S`` is the offset plus the link's best transit time. A sample whose delay
    exceeds that by ``MAX_AGE_S`` waited that long in some buffer on the way (a thin link):
    the residual it would bring back would be stale. The window is long, so that a link
    that stays slow does not become the reference; it starts again when the agent does
    (its sequence numbers start again, and its clock may have).
    """

    MAX_AGE_S = 0.6
    WINDOW_S = 60.0

    def __init__(self, host: str = "") -> None:
        """Judges the samples of an agent on ``host``.

        One on loopback is never too old: no link there holds samples back, and a stall
        of this machine's processes is not what the bound is for.
        """
        self._applies = not is_loopback(host) if host else True
        # (arrival, delay) pairs whose delays increase: a sliding-window minimum.
        self._minima: deque[tuple[float, float]] = deque()
        self._sequence = -1

    def too_old(self, event: Event) -> bool:
        """Whether ``event`` waited more than ``MAX_AGE_S`` longer than the best recent sample."""
        if not self._applies:
            return False
        sent = _monotonic_stamp(event, StampSemantics.SERVICE_SEND)
        received = _monotonic_stamp(event, StampSemantics.CLIENT_RECEIVE)
        if sent is None or received is None:
            return False
        if event.sequence < self._sequence:  # a new agent process: a new reference
            self._minima.clear()
        self._sequence = event.sequence
        delay = received - sent
        while self._minima and self._minima[-1][1] >= delay:
            self._minima.pop()
        self._minima.append((received, delay))
        while self._minima[0][0] < received - self.WINDOW_S:
            self._minima.popleft()
        return delay - self._minima[0][1] > self.MAX_AGE_S


def _monotonic_stamp(event: Event, semantics: str) -> float | None:
    for stamp in event.timestamps:
        if stamp.semantics == semantics and stamp.clock_name.endswith("/monotonic"):
            return stamp.stamp
    return None


class Relays:
    """The queue of samples to relay, ``max_in_flight`` relays at once, batches when they queue."""

    def __init__(self, supervisor: Any, max_in_flight: int, max_batch: int) -> None:
        self._supervisor = supervisor
        self._counts: dict[str, int] = supervisor.counts
        self._log = supervisor.service.logger
        self.max_in_flight = max_in_flight
        self.max_batch = max_batch
        self._pending: asyncio.Queue[tuple[AgentLink, Event]] = asyncio.Queue(MAX_PENDING)
        self._overloaded = False
        # Whether storage offers /update_storage_batch; None until a batch asks.
        self._batches: bool | None = None
        self._background: set[asyncio.Future[Any]] = set()

    def put(self, link: AgentLink, event: Event) -> None:
        """Queues a sample to relay; counts it as dropped if the queue is full."""
        try:
            self._pending.put_nowait((link, event))
        except asyncio.QueueFull:
            self._counts["dropped"] += 1
            if not self._overloaded:
                self._overloaded = True
                self._log.warning("overloaded: dropping samples that cannot be relayed in time (counted)")

    def workers(self) -> list[Coroutine[Any, Any, None]]:
        """The ``max_in_flight`` relay loops, to run beside the server."""
        return [self._work() for _ in range(self.max_in_flight)]

    def in_background(self, job: Coroutine[Any, Any, Any]) -> None:
        """Runs a call that must not hold up its caller (one agent slow to answer, say)."""
        future = asyncio.ensure_future(job)
        self._background.add(future)
        future.add_done_callback(self._background.discard)

    async def _work(self) -> None:
        while True:
            batch = [await self._pending.get()]
            while len(batch) < self.max_batch and not self._pending.empty():
                batch.append(self._pending.get_nowait())
            if len(batch) == 1 or self._batches is False:
                for link, event in batch:
                    await self._supervisor.relay(link, event)
            else:
                await self._relay_batch(batch)
            if self._overloaded and self._pending.empty():
                self._overloaded = False
                self._log.info("caught up: dropped %d samples so far", self._counts["dropped"])

    async def _relay_batch(self, batch: list[tuple[AgentLink, Event]]) -> None:
        """Stores a batch in one call; tells each agent the residual its last sample left."""
        storage = self._supervisor.storage
        try:
            reply = await storage.request_reply("/update_storage_batch", Int32Value(value=len(batch)))
            result = storage.decode_reply("/update_storage_batch", reply)
        except (PeerUnavailable, wire.WrongMessage):
            self._counts["not_stored"] += len(batch)
            return
        if not isinstance(result, Struct):  # farm-ng's original storage: Empty for unknown paths
            self._batches = False
            self._log.info("storage takes no batches: storing one sample per call")
            for link, event in batch:
                await self._supervisor.relay(link, event)
            return
        self._batches = True
        try:
            stored, residual = batch_result(result, len(batch))
        except wire.WrongMessage as exc:
            self._counts["not_stored"] += len(batch)
            self._log.debug("storage's batch reply: %s", exc)
            return
        self._counts["stored"] += stored
        self._counts["refused"] += len(batch) - stored
        latest: dict[str, tuple[AgentLink, int, Event]] = {}
        for (link, event), left in zip(batch, batch_residuals(stored, residual, len(batch))):
            self._log.info("Residual: value: %d", left)
            latest[link.name] = (link, left, event)
        await asyncio.gather(
            *(
                self._supervisor.send_residual(link, Int32Value(value=left), wire.residual_stamps(reply.event, event))
                for link, left, event in latest.values()
            )
        )

    def figures(self) -> dict[str, Any]:
        """The relays' part of ``/stats``."""
        return {"max_in_flight": self.max_in_flight, "max_batch": self.max_batch, "pending": self._pending.qsize()}


def batch_result(result: Struct, items: int) -> tuple[int, int]:
    """How many of ``items`` storage stored, and the residual after them, from its reply.

    Raises:
        WrongMessage: the reply does not hold two whole numbers that fit a batch of
            ``items`` and an ``Int32Value`` residual.

    """
    numbers = [result[key] if key in result else None for key in ("stored", "residual")]  # noqa: SIM401 (Struct has no get)
    if not all(isinstance(number, float) and number.is_integer() for number in numbers):
        msg = f"a batch reply needs whole numbers 'stored' and 'residual', not {numbers}"
        raise wire.WrongMessage(msg)
    stored, residual = (int(number) for number in numbers)
    if not (0 <= stored <= items and residual >= 0 and residual + items < 2**31):
        msg = f"a batch reply of stored={stored}, residual={residual} does not fit a batch of {items}"
        raise wire.WrongMessage(msg)
    return stored, residual


def batch_residuals(stored: int, residual: int, items: int) -> list[int]:
    """The residual each item of a batch left, as if stored one at a time.

    Storage stored the first ``stored`` of ``items`` and had ``residual`` left after the
    last: the i-th stored item left ``residual + stored - 1 - i``; a refused one, ``residual``.
    """
    return [residual + max(stored - 1 - index, 0) for index in range(items)]
