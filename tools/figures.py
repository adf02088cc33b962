"""What the tools read off the services' events: when each was sent, and ``/stats`` figures checked before use.

Anyone can publish a ``/stats``: a figure that is not a number reads as NaN, which every sum
and rate carries through and the tools show as ``invalid``; one that is absent reads as None, shown as ``-``.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from farm_ng.core.event_pb2 import Event
from farm_ng.core.stamp import StampSemantics, get_stamp_by_semantics_and_clock_type

INVALID = "invalid"
NONE = "-"


def sent_at(event: Event) -> float | None:
    """When the service sent an event, by its host's monotonic clock (None if not stamped)."""
    return get_stamp_by_semantics_and_clock_type(event, StampSemantics.SERVICE_SEND, "monotonic")


def received_at(event: Event) -> float | None:
    """When the client received an event, by its host's monotonic clock (None if not stamped)."""
    return get_stamp_by_semantics_and_clock_type(event, StampSemantics.CLIENT_RECEIVE, "monotonic")


def number(figures: Mapping[str, Any], key: str) -> float | None:
    """A figure as a finite number; None if absent, NaN if it is not one (a string, NaN, infinity, a flag)."""
    if key not in figures:
        return None
    value = figures[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return math.nan
    return float(value)


def shown(value: float | None, form: str = "{:.0f}") -> str:
    """A number in ``form``; ``-`` while unknown, ``invalid`` if it is not a finite number."""
    if value is None:
        return NONE
    return form.format(value) if math.isfinite(value) else INVALID
