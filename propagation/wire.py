"""The example's wire: each path with the one message it carries, and the extra timestamps.

farm-ng-core names a message's type in the event's URI query (``type=...&pb=...``) and,
asked to decode, imports the module the query names and calls the attribute it names:
the sender chooses what code runs. This example decodes by the path instead, with the
table below, and refuses what does not match it (``guard`` on the server side, ``peers``
on the client side).

The extra ``Timestamp``s travel beside farm-ng-core's own on the events; a program that
knows only the original contract ignores them.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import TYPE_CHECKING, Mapping

from farm_ng.core.stamp import StampSemantics, get_monotonic_now
from farm_ng.core.uri import get_host_name, uri_query_to_dict
from google.protobuf.empty_pb2 import Empty
from google.protobuf.message import DecodeError, Message
from google.protobuf.struct_pb2 import Struct
from google.protobuf.wrappers_pb2 import Int32Value

from propagation.config import service_name_in

if TYPE_CHECKING:
    from farm_ng.core.event_pb2 import Event
    from farm_ng.core.timestamp_pb2 import Timestamp
    from farm_ng.core.uri_pb2 import Uri

__all__ = [
    "AGENT",
    "PUBLISHED",
    "REPLIES",
    "REQUESTS",
    "RESIDUAL_TIME",
    "SAMPLE_PUBLISHED",
    "STORAGE",
    "STORE_REFUSED",
    "SUPERVISOR",
    "WAKE_UP",
    "Contract",
    "ResidualOrder",
    "WrongMessage",
    "decode",
    "find_stamp",
    "host_monotonic_clock",
    "is_newer",
    "new_incarnation",
    "published_stamp",
    "residual_stamp",
    "residual_stamps",
    "sample_value",
    "service_name_of",
    "shown",
    "stamp_now",
]

# What each request/reply path carries in, and what its reply may be. A storage that
# does not know /update_storage_batch (farm-ng's original) replies Empty.
REQUESTS: Mapping[str, type[Message]] = {
    "/update_residual": Int32Value,
    "/update_storage": Empty,
    "/update_storage_batch": Int32Value,
}
REPLIES: Mapping[str, tuple[type[Message], ...]] = {
    "/update_residual": (Empty,),
    "/update_storage": (Int32Value,),
    "/update_storage_batch": (Struct, Empty),
}
# What each published path carries. /residual, /level, /pauses and /stats are this
# example's additions; /health is farm-ng-core's.
PUBLISHED: Mapping[str, type[Message]] = {
    "/sample": Struct,
    "/residual": Int32Value,
    "/level": Struct,
    "/pauses": Struct,
    "/stats": Struct,
    "/health": Struct,
}


@dataclasses.dataclass(frozen=True)
class Contract:
    """What one role serves: each request/reply path with its message, and the paths it publishes."""

    requests: Mapping[str, type[Message]]
    publishes: tuple[str, ...]


def serving(*paths: str) -> Mapping[str, type[Message]]:
    """The request/reply paths a role answers, with the message each carries in."""
    return {path: REQUESTS[path] for path in paths}


AGENT = Contract(requests=serving("/update_residual"), publishes=("/sample", "/pauses", "/stats", "/health"))
SUPERVISOR = Contract(requests={}, publishes=("/stats", "/health"))
STORAGE = Contract(
    requests=serving("/update_storage", "/update_storage_batch"),
    publishes=("/residual", "/level", "/stats", "/health"),
)


class WrongMessage(ValueError):
    """An event's message is not the one its path carries, or does not parse as it."""


def decode(event: Event, payload: bytes, expected: tuple[type[Message], ...] | type[Message]) -> Message:
    """Decodes a payload as the type its path carries, checking what the event says it is.

    The event's ``type=`` must name one of ``expected``: a payload decodes as almost any
    message (an ``Empty``'s empty payload is a valid ``Int32Value`` 0), so the type the
    sender named is checked, but never imported.

    Raises:
        WrongMessage: the event names another type, or the payload does not parse.

    """
    kinds = expected if isinstance(expected, tuple) else (expected,)
    named, file = _named_type(event)
    for kind in kinds:
        if named == kind.DESCRIPTOR.full_name:
            if file != kind.DESCRIPTOR.file.name:
                # farm-ng-core decodes by importing the module pb= names (the recorder
                # does): only the file that defines the type gets through.
                msg = f"{named} is not defined in {shown(file)}"
                raise WrongMessage(msg)
            try:
                return kind.FromString(payload)
            except DecodeError:
                msg = f"payload is not a valid {named}"
                raise WrongMessage(msg) from None
    wanted = " or ".join(kind.DESCRIPTOR.full_name for kind in kinds)
    msg = f"{event.uri.path or '(no path)'} carries {wanted}, not {named or 'an unnamed type'}"
    raise WrongMessage(msg)


def sample_value(sample: Message | bytes) -> float | None:
    """The number a ``/sample`` ``Struct`` carries as ``"sample"``; None if it has none."""
    if not isinstance(sample, Struct) or "sample" not in sample:
        return None
    value = sample["sample"]
    return value if isinstance(value, float) else None


def _named_type(event: Event) -> tuple[str, str]:
    """The type and the .proto file (``type=``, ``pb=``) a protobuf event names; empty if none."""
    if event.uri.scheme != "protobuf":
        return "", ""
    try:
        query = uri_query_to_dict(event.uri)
    except ValueError:  # a query part without "="
        return "", ""
    return query.get("type", ""), query.get("pb", "")


def shown(text: str, limit: int = 40) -> str:
    """Text from the wire, safe for one log line: quoted, cut short."""
    return repr(text[:limit] + ("..." if len(text) > limit else ""))


# ---------------------------------------------------------------------------------
# The extra timestamps

# On a residual: storage's monotonic time when the residual was true, on a clock named
# after its host and its incarnation. Residuals can overtake each other on the way to an
# agent (a relay per sample, a wake-up after each drain); this orders them.
RESIDUAL_TIME = "storage/residual"
# On a residual sent to an agent: when the agent published the sample that caused it.
SAMPLE_PUBLISHED = "agent/sample_published"
# On a refused store's reply: storage was full.
STORE_REFUSED = "storage/refused"
# On a residual a supervisor forwards after a drain, to wake an agent that paused.
WAKE_UP = "supervisor/wake_up"


def find_stamp(event: Event, semantics: str) -> Timestamp | None:
    """Returns the event's first timestamp with these semantics, if any."""
    for stamp in event.timestamps:
        if stamp.semantics == semantics:
            return stamp
    return None


def stamp_now(semantics: str) -> Timestamp:
    """A monotonic timestamp of this host, now."""
    return get_monotonic_now(semantics=semantics)


def residual_stamp(incarnation: str) -> Timestamp:
    """Storage's stamp on a residual: now, on its host's monotonic clock, this incarnation.

    A host's monotonic clock starts again near 0 when the host reboots; the incarnation
    (drawn when storage starts) tells the residuals of a new storage from the old one's.
    """
    stamp = get_monotonic_now(semantics=RESIDUAL_TIME)
    stamp.clock_name += f"#{incarnation}"
    return stamp


def new_incarnation() -> str:
    """A random id for one run of storage."""
    return os.urandom(6).hex()


def published_stamp(sample_event: Event) -> Timestamp | None:
    """When the agent published a sample (its monotonic send stamp), relabelled.

    The agent subtracts it from the time the residual arrives: the propagation latency.
    """
    for stamp in sample_event.timestamps:
        if stamp.semantics == StampSemantics.SERVICE_SEND and stamp.clock_name.endswith("/monotonic"):
            relabelled = type(stamp)()
            relabelled.CopyFrom(stamp)
            relabelled.semantics = SAMPLE_PUBLISHED
            return relabelled
    return None


def residual_stamps(reply_event: Event, sample_event: Event | None = None) -> list[Timestamp]:
    """The stamps a residual carries to an agent.

    When storage computed it (to order residuals), and, for a relayed sample, when the
    agent published that sample (to measure the propagation latency).
    """
    stamps = [find_stamp(reply_event, RESIDUAL_TIME)]
    if sample_event is not None:
        stamps.append(published_stamp(sample_event))
    return [stamp for stamp in stamps if stamp is not None]


def service_name_of(uri: Uri) -> str | None:
    """The ``service_name`` a URI's query names, if it names exactly one."""
    return service_name_in(uri.query)


def host_monotonic_clock() -> str:
    """The name farm-ng-core gives this host's monotonic clock."""
    return f"{get_host_name()}/monotonic"


class ResidualOrder:
    """Which residuals to apply: the newest of each storage incarnation, never the future.

    A residual without a stamp (from farm-ng's original supervisor) is always applied.
    One of another incarnation (storage restarted) is applied and starts a new order.
    One stamped later than now on this host's own clock is refused: no storage wrote it.
    """

    # Clock readings of two processes on one host, taken a moment apart, may cross by
    # this much.
    FUTURE_TOLERANCE_S = 0.01

    def __init__(self) -> None:
        self._clock = host_monotonic_clock()
        self.last: Timestamp | None = None

    def check(self, stamp: Timestamp | None) -> str:
        """``"apply"``, ``"stale"`` (older than the last applied) or ``"future"``; records an applied one."""
        if stamp is None:
            return "apply"
        if _clock_of(stamp) == self._clock and stamp.stamp > time.monotonic() + self.FUTURE_TOLERANCE_S:
            return "future"
        if self.last is not None and stamp.clock_name == self.last.clock_name and stamp.stamp <= self.last.stamp:
            return "stale"
        self.last = stamp
        return "apply"

    def forget(self) -> None:
        """Applies the next stamped residual whatever its order."""
        self.last = None

    def is_local(self, stamp: Timestamp) -> bool:
        """Whether a stamp is of this host's monotonic clock (so ``time.monotonic()`` compares)."""
        return _clock_of(stamp) == self._clock


def _clock_of(stamp: Timestamp) -> str:
    """The clock of a stamp without the incarnation: ``host/monotonic``."""
    return stamp.clock_name.partition("#")[0]


def is_newer(stamp: Timestamp | None, last: Timestamp | None) -> bool:
    """Whether ``stamp`` is later than ``last`` in one incarnation, or of another one."""
    return stamp is None or last is None or stamp.clock_name != last.clock_name or stamp.stamp > last.stamp
