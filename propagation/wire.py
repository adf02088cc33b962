"""The example's wire: each path with the one message it carries, and the extra timestamps.

farm-ng-core decodes a message by the type its event's URI names (``type=...&pb=...``): it
imports the module the query names and calls the attribute it names, so the sender chooses
what code runs. This example decodes by the path instead, with the tables below, and refuses
what does not match (``guard`` for servers, ``peers`` for clients). The extra ``Timestamp``s
travel beside farm-ng-core's own; a program that knows only the original contract ignores them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, NamedTuple

from farm_ng.core.stamp import StampSemantics
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

# What each request/reply path may reply. A storage that does not know
# /update_storage_batch (farm-ng's original) replies Empty.
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


class Contract(NamedTuple):
    """What one role serves: each request/reply path with the message it carries in, and the paths it publishes."""

    requests: Mapping[str, type[Message]]
    publishes: tuple[str, ...]


AGENT = Contract(requests={"/update_residual": Int32Value}, publishes=("/sample", "/pauses", "/stats", "/health"))
SUPERVISOR = Contract(requests={}, publishes=("/stats", "/health"))
STORAGE = Contract(
    requests={"/update_storage": Empty, "/update_storage_batch": Int32Value},
    publishes=("/residual", "/level", "/stats", "/health"),
)


class WrongMessage(ValueError):
    """An event's message is not the one its path carries, or does not parse as it."""


def decode(event: Event, payload: bytes, expected: tuple[type[Message], ...] | type[Message]) -> Message:
    """Decodes a payload as the type its path carries, checking what the event says it is.

    The event's ``type=`` must name one of ``expected``, since a payload decodes as almost any
    message (an ``Empty``'s is a valid ``Int32Value`` 0); it is checked, never imported.

    Raises:
        WrongMessage: the event names another type, or the payload does not parse.

    """
    kinds = expected if isinstance(expected, tuple) else (expected,)
    try:  # the type and the .proto file a protobuf event names
        query = uri_query_to_dict(event.uri) if event.uri.scheme == "protobuf" else {}
    except ValueError:  # a query part without "="
        query = {}
    named, file = query.get("type", ""), query.get("pb", "")
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
    value = sample["sample"] if isinstance(sample, Struct) and "sample" in sample else None
    return value if isinstance(value, float) else None


def shown(text: str, limit: int = 40) -> str:
    """Text from the wire, safe for one log line: quoted, cut short."""
    return repr(text[:limit] + ("..." if len(text) > limit else ""))


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
    return next((stamp for stamp in event.timestamps if stamp.semantics == semantics), None)


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
