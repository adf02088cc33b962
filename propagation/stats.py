"""What the services count for ``/stats``: counters, and latencies over a recent window.

Counters only grow while a service runs, so a reader (the monitor, the benchmark) turns
two ``/stats`` of a service into a rate.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from google.protobuf.struct_pb2 import Struct

if TYPE_CHECKING:
    from farm_ng.core.event_service import EventServiceGrpc

__all__ = ["LATENCY_WINDOW_S", "LatencyWindow", "LevelRecord", "percentile"]

# Propagation latencies kept for the percentiles in /stats, and how far back they reach.
LATENCY_WINDOW_S = 5.0
MAX_LATENCIES = 10_000


class LatencyWindow:
    """Latencies of the last ``LATENCY_WINDOW_S`` seconds, for percentiles."""

    def __init__(self, name: str, window_s: float = LATENCY_WINDOW_S) -> None:
        """Keeps latencies under ``<name>_p50_ms`` ... in ``figures()``."""
        self._name = name
        self._window_s = window_s
        self._values: deque[tuple[float, float]] = deque(maxlen=MAX_LATENCIES)

    def add(self, seconds: float) -> None:
        """Records one latency, now."""
        self._values.append((time.monotonic(), seconds))

    def figures(self) -> dict[str, Any]:
        """``<name>_p50_ms``, ``_p90_ms``, ``_p99_ms`` and ``_count``; empty if none is recent."""
        horizon = time.monotonic() - self._window_s
        while self._values and self._values[0][0] < horizon:
            self._values.popleft()
        ordered = sorted(value for _, value in self._values)
        if not ordered:
            return {}
        figures: dict[str, Any] = {
            f"{self._name}_p{int(100 * fraction)}_ms": 1000 * percentile(ordered, fraction)
            for fraction in (0.50, 0.90, 0.99)
        }
        figures[f"{self._name}_count"] = len(ordered)
        return figures


def percentile(ordered: list[float], fraction: float) -> float:
    """The value below which ``fraction`` of ``ordered`` (sorted, non-empty) lies."""
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


class LevelRecord:
    """Storage's count on ``/level`` (latched), published where it keeps the peaks.

    ``/stats`` comes once a second and ``/residual`` after drains: a plot of either never
    shows how full storage got. Published before and after each drain and when the count
    reaches ``max_storage``, ``/level`` does, without a message per store.
    """

    def __init__(self, service: EventServiceGrpc, max_storage: int) -> None:
        self._service = service
        self._max = max_storage
        self._was_full = False
        # farm-ng-core's publish reads and bumps its sequence around an await.
        self._publishing = asyncio.Lock()

    async def publish(self, count: int, only_if_full: bool = False) -> None:
        """Publishes ``count``; with ``only_if_full``, only when it has just reached the maximum."""
        full = count == self._max
        if only_if_full and (not full or self._was_full):
            return
        self._was_full = full
        level = Struct()
        level.update({"count": count, "max_storage": self._max})
        async with self._publishing:
            await self._service.publish("/level", level, latch=True)
