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
from typing import TYPE_CHECKING, Mapping

from farm_ng.core.stamp import StampSemantics, get_stamp_by_semantics_and_clock_type
from farm_ng.core.timestamp_pb2 import Timestamp
from farm_ng.core.uri import uri_query_to_dict
from google.protobuf.empty_pb2 import Empty
from google.protobuf.message import DecodeError, Message
from google.protobuf.struct_pb2 import Struct
from google.protobuf.wrappers_pb2 import Int32Value

if TYPE_CHECKING:
    from farm_ng.core.event_pb2 import Event

# A residual travels as Int32Value.
INT32_MAX = 2**31 - 1
# The count an /update_storage_batch may carry: at most a supervisor's max_batch.
MAX_BATCH = 256

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


def check_request(path: str, message: Message) -> None:
    """Checks what a request carries against its path's range: a batch stores 1 to ``MAX_BATCH``.

    Raises:
        WrongMessage: it is off the range.

    """
    if path == "/update_storage_batch" and not 1 <= message.value <= MAX_BATCH:  # type: ignore[attr-defined]
        msg = f"a batch of {message.value} is off 1..{MAX_BATCH}"  # type: ignore[attr-defined]
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

# On a residual: when storage computed it, on its clock of this incarnation
# (propagation.residuals orders residuals by it).
RESIDUAL_TIME = "storage/residual"
# On a residual sent to an agent: when the agent published the sample that caused it.
SAMPLE_PUBLISHED = "agent/sample_published"
# On a refused store's reply: storage was full.
STORE_REFUSED = "storage/refused"


def find_stamp(event: Event, semantics: str) -> Timestamp | None:
    """Returns the event's first timestamp with these semantics, if any."""
    for stamp in event.timestamps:
        if stamp.semantics == semantics:
            return stamp
    return None


def sent_at(event: Event) -> float | None:
    """When an event was sent, on its sender's monotonic clock (farm-ng-core's send stamp)."""
    return get_stamp_by_semantics_and_clock_type(event, StampSemantics.SERVICE_SEND, "monotonic")


def residual_stamps(reply_event: Event, sample_event: Event | None = None) -> list[Timestamp]:
    """The stamps a residual carries to an agent.

    When storage computed it (to order residuals), and, for a relayed sample, the sample's
    send stamp relabelled (to measure the propagation latency): it keeps the agent's clock
    name, so that the agent can tell it is its own clock.
    """
    stamps = [stamp for stamp in [find_stamp(reply_event, RESIDUAL_TIME)] if stamp is not None]
    for sent in sample_event.timestamps if sample_event is not None else ():
        if sent.semantics == StampSemantics.SERVICE_SEND and sent.clock_name.endswith("/monotonic"):
            stamps.append(Timestamp(stamp=sent.stamp, clock_name=sent.clock_name, semantics=SAMPLE_PUBLISHED))
            break
    return stamps
