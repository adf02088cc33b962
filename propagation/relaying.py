"""What a supervisor's round trip (``Supervisor.store``, then ``Supervisor.tell``) stands on.

Why each part is as it is: docs/design.md, "Relays, batches and freshness".
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections import deque
from typing import TYPE_CHECKING, Any

from farm_ng.core.stamp import StampSemantics, get_stamp_by_semantics_and_clock_type
from google.protobuf.struct_pb2 import Struct

from propagation import wire
from propagation.config import service_name_in
from propagation.logs import Tally
from propagation.network import is_loopback
from propagation.peers import FRESH_STREAM_OPTIONS, PeerClient
from propagation.residuals import Outbox

if TYPE_CHECKING:
    from farm_ng.core.event_pb2 import Event
    from farm_ng.core.event_service_pb2 import EventServiceConfig, SubscribeRequest
    from google.protobuf.message import Message

    from propagation.cli import ServiceSpec

# Samples waiting for a free worker; a batch takes at most this many.
MAX_PENDING = 64


@dataclasses.dataclass
class SupervisorCounts:
    """What a supervisor counts for ``/stats``: each sample ends in exactly one count, as docs/design.md says."""

    received: int = 0
    malformed: int = 0
    below_confidence: int = 0
    too_old: int = 0
    stored: int = 0
    refused: int = 0
    not_stored: int = 0
    unconfirmed: int = 0
    dropped: int = 0
    # Residuals from storage below 0: no room, relayed as 0.
    negative_residuals: int = 0
    # /residual events that came less than MIN_RESIDUAL_GAP_S after the last: a flood, skipped.
    residuals_skipped: int = 0
    # Calls to tell an agent its residual that failed, and wake-ups that reached an agent.
    unsent: int = 0
    wakeups: int = 0


class AgentLink:
    """One supervised agent: its client, its subscription, its freshness, and its ``Outbox``."""

    def __init__(self, agent: EventServiceConfig, subscription: SubscribeRequest, owner: str) -> None:
        # Decided once per agent: on loopback no link is thin (see FRESH_STREAM_OPTIONS).
        loopback = is_loopback(agent.host)
        self.agent = PeerClient(agent, owner, channel_options=() if loopback else FRESH_STREAM_OPTIONS)
        self.subscription = subscription
        self.name = agent.name
        self.freshness = Freshness(applies=not loopback)
        self.outbox = Outbox()

    @classmethod
    def of_subscriptions(cls, spec: ServiceSpec[Any], owner: str) -> dict[str, AgentLink]:
        """A link to each agent of the supervisor's ``subscriptions``, by name; ``owner`` names it in log lines."""
        subscriptions = spec.config.subscriptions
        links = (cls(spec.config_of(service_name_in(each.uri.query) or ""), each, owner) for each in subscriptions)
        return {link.name: link for link in links}


class SampleQueue:
    """Samples above confidence waiting for a relay: at most ``MAX_PENDING``, taken in batches.

    Beyond that a sample is dropped: why, docs/design.md, "Relays, batches and freshness".
    """

    def __init__(self, max_batch: int, counts: SupervisorCounts, log: logging.Logger) -> None:
        self.max_batch = max_batch
        self._counts = counts
        self._pending: asyncio.Queue[tuple[AgentLink, Event]] = asyncio.Queue(MAX_PENDING)
        # A slow or unreachable storage fills and empties the queue many times a second.
        self._drops = Tally(log)

    def put(self, link: AgentLink, event: Event) -> None:
        """Queues a sample to relay; counts it as dropped if the queue is full."""
        try:
            self._pending.put_nowait((link, event))
        except asyncio.QueueFull:
            self._counts.dropped += 1
            self._drops.add("dropped %d samples: the relays could not keep up (dropped in /stats)")

    async def next_batch(self) -> list[tuple[AgentLink, Event]]:
        """The next sample, and those queued behind it, up to ``max_batch``."""
        batch = [await self._pending.get()]
        while len(batch) < self.max_batch and not self._pending.empty():
            batch.append(self._pending.get_nowait())
        return batch

    def __len__(self) -> int:
        return self._pending.qsize()


def store_outcome(path: str, reply: Message, event: Event, items: int) -> tuple[int, int]:
    """How many of ``items`` storage stored, and the residual after them, from its reply to ``path``.

    ``/update_storage`` replies the residual, stamped when it refused; ``/update_storage_batch``
    a ``Struct``. A residual below 0 (farm-ng's original storage counts on past its maximum)
    comes back as it is: the caller takes it as no room.

    Raises:
        WrongMessage: the reply does not fit the call.

    """
    if path == "/update_storage":
        return (0 if wire.find_stamp(event, wire.STORE_REFUSED) else 1), reply.value  # type: ignore[attr-defined]
    if not isinstance(reply, Struct):
        msg = f"{path} replied {type(reply).__name__}"
        raise wire.WrongMessage(msg)
    return batch_result(reply, items)


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
    if not (0 <= stored <= items and residual >= -wire.INT32_MAX and residual + items <= wire.INT32_MAX):
        msg = f"a batch reply of stored={stored}, residual={residual} does not fit a batch of {items}"
        raise wire.WrongMessage(msg)
    return stored, residual


def batch_residuals(stored: int, residual: int, items: int) -> list[int]:
    """The residual each item of a batch left, as if stored one at a time.

    Storage stored the first ``stored`` of ``items`` and had ``residual`` left after the
    last: the i-th stored item left ``residual + stored - 1 - i``; a refused one, ``residual``.
    """
    return [residual + max(stored - 1 - index, 0) for index in range(items)]


class Freshness:
    """Whether a sample waited too long on the way to relay (docs/design.md, "freshness").

    Its delay (arrival here minus sending on the agent's clock) is compared with the smallest
    of the last ``WINDOW_S``; with ``applies=False`` (an agent on loopback) none is too old.
    """

    MAX_AGE_S = 0.6
    WINDOW_S = 60.0

    def __init__(self, applies: bool = True) -> None:
        self._applies = applies
        # (arrival, delay) pairs whose delays increase: a sliding-window minimum.
        self._minima: deque[tuple[float, float]] = deque()
        self._sequence = -1

    def too_old(self, event: Event) -> bool:
        """Whether ``event`` waited more than ``MAX_AGE_S`` longer than the best recent sample."""
        sent = get_stamp_by_semantics_and_clock_type(event, StampSemantics.SERVICE_SEND, "monotonic")
        received = get_stamp_by_semantics_and_clock_type(event, StampSemantics.CLIENT_RECEIVE, "monotonic")
        if not self._applies or sent is None or received is None:
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
