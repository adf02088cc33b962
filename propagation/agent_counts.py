"""What an agent counts for ``/stats``, and which residuals it applies.

Residuals reach an agent by several routes (a relay per sample, a wake-up after each
drain) and can overtake each other; storage stamps each with the time it was true, and
the agent applies only the newest (``wire.ResidualOrder``). A stamp later than now on
the agent's own clock is refused: no storage wrote it. An agent paused for longer than
``STUCK_S`` without applying a residual takes the next wake-up whatever it was told before.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from google.protobuf.struct_pb2 import Struct

from propagation import wire
from propagation.stats import LatencyWindow

if TYPE_CHECKING:
    from farm_ng.core.event_pb2 import Event

    from propagation.pacing import Pacer

__all__ = ["AgentCounts"]


class AgentCounts:
    """What an agent counts for ``/stats``, and which residuals it applies."""

    # Paused this long without applying a residual, an agent takes the next wake-up
    # whatever order it was told before: a few of storage's drain periods.
    STUCK_S = 1.0

    def __init__(self, rate: float, num_tasks: int) -> None:
        self.rate = rate
        self.num_tasks = num_tasks
        self.order = wire.ResidualOrder()
        self.published = self.residuals = self.stale_residuals = self.future_residuals = 0
        self.pauses = self.resumes = 0
        self.warned_slow = False
        self.last_residual = time.monotonic()
        self.resume_delays = LatencyWindow("resume", window_s=60.0)
        self.latencies = LatencyWindow("latency")

    def applies(self, event: Event, paused: bool) -> bool:
        """Whether a residual is newer than the last applied; counts it either way."""
        stamp = wire.find_stamp(event, wire.RESIDUAL_TIME)
        verdict = self.order.check(stamp)
        stuck = paused and time.monotonic() - self.last_residual > self.STUCK_S
        if verdict == "stale" and stuck and wire.find_stamp(event, wire.WAKE_UP) is not None:
            self.order.forget()
            verdict = self.order.check(stamp)
        if verdict == "future":
            self.future_residuals += 1
            return False
        if verdict == "stale":
            self.stale_residuals += 1
            return False
        self.last_residual = time.monotonic()
        self.residuals += 1
        published = wire.find_stamp(event, wire.SAMPLE_PUBLISHED)
        if published is not None and self.order.is_local(published):
            self.latencies.add(time.monotonic() - published.stamp)
        return True

    def paused(self) -> None:
        """Counts a pause."""
        self.pauses += 1

    def resumed(self, event: Event) -> None:
        """Counts a resume, and how long after storage made room it came."""
        self.resumes += 1
        made_room = wire.find_stamp(event, wire.RESIDUAL_TIME)
        if made_room is not None and self.order.is_local(made_room):
            self.resume_delays.add(time.monotonic() - made_room.stamp)

    def pause_figures(self) -> Struct:
        """What ``/pauses`` carries: whether paused, and the pauses and resumes so far."""
        message = Struct()
        message.update({"paused": self.pauses > self.resumes, "pauses": self.pauses, "resumes": self.resumes})
        return message

    def figures(self, pacer: Pacer, remainder: int | None) -> dict[str, object]:
        """The figures ``/stats`` carries."""
        figures: dict[str, object] = {
            "rate": self.rate,
            "num_tasks": self.num_tasks,
            "published": self.published,
            "missed_slots": pacer.missed_slots,
            "paused": not pacer.room.is_set(),
            "pauses": self.pauses,
            "resumes": self.resumes,
            "residuals": self.residuals,
            "stale_residuals": self.stale_residuals,
            "future_residuals": self.future_residuals,
            **self.latencies.figures(),
            **self.resume_delays.figures(),
        }
        if remainder is not None:
            figures["remainder"] = remainder
        return figures
