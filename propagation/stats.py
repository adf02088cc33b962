"""What the services count for ``/stats``: counters, and latencies over a recent window.

Counters only grow while a service runs, so a reader (the monitor, the benchmark) turns
two ``/stats`` of a service into a rate.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from google.protobuf import json_format
from google.protobuf.struct_pb2 import Struct

from propagation.residuals import same_host_clock
from propagation.wire import RESIDUAL_TIME, SAMPLE_PUBLISHED, find_stamp

if TYPE_CHECKING:
    from farm_ng.core.event_pb2 import Event

# Propagation latencies kept for the percentiles in /stats, and how far back they reach.
LATENCY_WINDOW_S = 5.0
MAX_LATENCIES = 10_000
COUNTS = ("rate", "num_tasks", "published", "pauses", "resumes", "residuals", "stale_residuals", "future_residuals")


class LatencyWindow:
    """Latencies of the last ``window_s`` seconds, for percentiles named ``<name>_p50_ms`` ..."""

    def __init__(self, name: str, window_s: float = LATENCY_WINDOW_S) -> None:
        self._name = name
        self._window_s = window_s
        self._values: deque[tuple[float, float]] = deque(maxlen=MAX_LATENCIES)

    def add(self, seconds: float) -> None:
        """Records one latency, now."""
        self._values.append((time.monotonic(), seconds))

    def figures(self) -> dict[str, Any]:
        """``<name>_p50_ms``, ``_p90_ms``, ``_p99_ms`` and ``_count``; empty if none is recent."""
        horizon = time.monotonic() - self._window_s
        ordered = sorted(value for when, value in self._values if when >= horizon)
        if not ordered:
            return {}
        percentiles = {  # each the value below which that percentage of them lies
            f"{self._name}_p{percent}_ms": 1000 * ordered[len(ordered) * percent // 100] for percent in (50, 90, 99)
        }
        return {**percentiles, f"{self._name}_count": len(ordered)}


@dataclasses.dataclass
class AgentCounts:
    """What an agent counts for ``/stats`` and ``/pauses``."""

    rate: float
    num_tasks: int
    local_clock: str  # this host's monotonic clock: the stamps a latency can be read from
    published: int = 0
    residuals: int = 0
    stale_residuals: int = 0
    future_residuals: int = 0
    pauses: int = 0
    resumes: int = 0
    warned_slow: bool = False
    latencies: LatencyWindow = dataclasses.field(default_factory=lambda: LatencyWindow("latency"))
    resume_delays: LatencyWindow = dataclasses.field(default_factory=lambda: LatencyWindow("resume", window_s=60.0))

    def residual(self, verdict: str, event: Event) -> None:
        """Counts a residual by its verdict; an applied one's latency, from its sample's publishing."""
        if verdict == "stale":
            self.stale_residuals += 1
        elif verdict == "future":
            self.future_residuals += 1
        else:
            self.residuals += 1
            self._since(event, SAMPLE_PUBLISHED, self.latencies)

    def paused(self) -> None:
        """Counts a pause."""
        self.pauses += 1

    def resumed(self, event: Event) -> None:
        """Counts a resume, and how long after storage made room it came."""
        self.resumes += 1
        self._since(event, RESIDUAL_TIME, self.resume_delays)

    def _since(self, event: Event, semantics: str, window: LatencyWindow) -> None:
        if (stamp := find_stamp(event, semantics)) is not None and same_host_clock(stamp, self.local_clock):
            window.add(time.monotonic() - stamp.stamp)

    def pause_figures(self, paused: bool) -> Struct:
        """What ``/pauses`` carries: whether paused, and the pauses and resumes so far."""
        return json_format.ParseDict({"paused": paused, "pauses": self.pauses, "resumes": self.resumes}, Struct())

    def figures(self) -> dict[str, Any]:
        """The counters in ``/stats``, with the latency percentiles."""
        counters = {name: getattr(self, name) for name in COUNTS}
        return {**counters, **self.latencies.figures(), **self.resume_delays.figures()}
