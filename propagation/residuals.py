"""When an agent publishes: one rule, made of levels re-asserted on a period (docs/design.md).

Storage re-asserts its residual (``DrainTicks``, ``ResidualClock``), each agent whether it is
paused, a supervisor forwards storage's room to each agent that may be paused (``Outbox``,
``PauseView``), an agent applies the newest residual (``ResidualFilter``). So an agent resumes
within ``resume_bound(drain_period)`` of storage having room, whatever was lost, delayed,
reordered or restarted before (tests/test_liveness.py checks it).
"""

from __future__ import annotations

import os
import time
from typing import Any

from farm_ng.core.timestamp_pb2 import Timestamp
from farm_ng.core.uri import get_host_name

from propagation.wire import RESIDUAL_TIME

# Storage re-asserts its residual at least this often, whatever its drain period.
MIN_REASSERT_S = 0.5
# An agent re-asserts whether it is paused this often, and at each change at most every
# PAUSES_MIN_GAP_S (a flood of residuals is not a flood of /pauses).
PAUSES_PERIOD_S = 1.0
PAUSES_MIN_GAP_S = 0.05
# A supervisor handles a /residual at most this often: storage publishes one every half
# second or so, and after each drain; more is a flood. What is skipped, it says again.
MIN_RESIDUAL_GAP_S = 0.05
# What messages may take on the way, on top of the periods, in the bound.
BOUND_SLACK_S = 1.0


def reassert_period(drain_period: float) -> float:
    """``P``: the longest storage goes without publishing its residual."""
    return max(drain_period, MIN_REASSERT_S)


def resume_bound(drain_period: float) -> float:
    """``B``: an agent resumes at most this long after storage has room."""
    return 2 * reassert_period(drain_period) + BOUND_SLACK_S


class ResidualClock:
    """Storage's stamps on residuals: when each was true, in an order that survives restarts.

    The host's monotonic clock, named ``host/monotonic#<start>-<random>``: ``<start>`` is when
    this storage started, in nanoseconds of the system clock (``order_key``).
    """

    def __init__(self, host_clock: str | None = None, started_ns: int | None = None) -> None:
        """A clock of this host, started now (both may be given, for a simulation)."""
        host_clock = host_clock or f"{get_host_name()}/monotonic"
        started = time.time_ns() if started_ns is None else started_ns
        self.name = f"{host_clock}#{started}-{os.urandom(3).hex()}"

    def stamp(self, now: float | None = None) -> Timestamp:
        """``now`` (the monotonic clock's by default) on this storage's clock."""
        return Timestamp(stamp=time.monotonic() if now is None else now, clock_name=self.name, semantics=RESIDUAL_TIME)


class DrainTicks:
    """Storage's beat: each ``drain_period`` it drains a batch if it holds one, then publishes its residual.

    Without a drain, it publishes the residual at least every ``reassert_period``.
    """

    def __init__(self, drain_period: float, batch_size: int) -> None:
        self.batch_size = batch_size
        self._ticks_per_residual = max(1, round(reassert_period(drain_period) / drain_period))
        self._since_residual = 0

    def tick(self, count: int) -> tuple[bool, bool]:
        """Whether to drain a batch on this tick, and whether to publish the residual after it."""
        drain = count >= self.batch_size
        self._since_residual += 1
        publish = drain or self._since_residual >= self._ticks_per_residual
        if publish:
            self._since_residual = 0
        return drain, publish


def order_key(stamp: Timestamp) -> tuple[int, str, float]:
    """Where a residual stands: incarnation start (a name without one, as a forged one, first), incarnation, time."""
    incarnation = stamp.clock_name.partition("#")[2]
    start = incarnation.partition("-")[0]
    return (int(start) if start.isdigit() and len(start) < 30 else 0, incarnation, stamp.stamp)


def same_host_clock(stamp: Timestamp, local_clock: str) -> bool:
    """Whether a stamp is of ``local_clock`` (``host/monotonic``), whatever its incarnation."""
    return stamp.clock_name.partition("#")[0] == local_clock


class ResidualFilter:
    """Which residuals an agent applies: the newest of storage's, never one from the future.

    One older than the last applied is stale within ``WINDOW_S`` of it; one without a stamp
    (farm-ng's original supervisor) always applies. Why: docs/design.md, "Residual order".
    """

    WINDOW_S = 2.0
    # Clock readings of two processes on one host, taken a moment apart, may cross by this much.
    FUTURE_TOLERANCE_S = 0.01

    def __init__(self, local_clock: str | None = None) -> None:
        """Filters for an agent whose host's monotonic clock is ``local_clock`` (this host's by default)."""
        self.local_clock = local_clock or f"{get_host_name()}/monotonic"
        self._last: tuple[int, str, float] | None = None
        self._last_applied = 0.0

    def verdict(self, stamp: Timestamp | None, now: float) -> str:
        """``"apply"`` (it becomes the newest), ``"stale"`` or ``"future"`` for a residual arriving at ``now``."""
        if stamp is None:
            return "apply"
        if same_host_clock(stamp, self.local_clock) and stamp.stamp > now + self.FUTURE_TOLERANCE_S:
            return "future"
        key = order_key(stamp)
        if self._last is not None and key <= self._last and now - self._last_applied < self.WINDOW_S:
            return "stale"
        self._last, self._last_applied = key, now
        return "apply"


class PauseView:
    """Whether an agent may be paused: its own word (``/pauses``), or else the last residual delivered to it.

    An agent that never says (farm-ng's original) applies residuals as they come.
    """

    def __init__(self) -> None:
        self.reported: bool | None = None  # the last /pauses; None until one comes
        self.delivered: int | None = None  # the last residual delivered; None until one is

    def may_be_paused(self) -> bool:
        """Whether a wake-up could be needed: paused, or not known to be publishing."""
        if self.reported is not None:
            return self.reported
        return self.delivered is None or self.delivered <= 0


class Outbox:
    """What a supervisor has to tell one agent: a few calls at a time, the newest residual next.

    ``MAX_CALLS`` at once, one for an agent that never says whether it is paused; a newer
    residual replaces one that waits (``superseded``). Why: docs/design.md, "Residual order".
    """

    MAX_CALLS = 4

    def __init__(self) -> None:
        self.pauses = PauseView()
        self.waiting: tuple[int, list[Timestamp], bool] | None = None  # value, stamps, whether a wake-up
        self.calls = 0  # under way
        self.superseded = 0

    def tell(self, residual: int, stamps: list[Timestamp], wake_up: bool = False) -> None:
        """Queues ``residual`` for the agent, unless a newer one waits (by storage's stamp; of two equal, the later)."""
        if self.waiting is not None:
            self.superseded += 1
            if _newness(stamps) < _newness(self.waiting[1]):
                return
        self.waiting = (residual, stamps, wake_up)

    def take(self) -> tuple[int, list[Timestamp], bool] | None:
        """The residual to send now, if one waits and a call is free; that call is then under way."""
        limit = self.MAX_CALLS if self.pauses.reported is not None else 1
        if self.calls >= limit or self.waiting is None:
            return None
        taken, self.waiting = self.waiting, None
        self.calls += 1
        return taken

    def done(self, delivered: int | None) -> None:
        """A call ended: ``delivered`` is the residual it delivered, None if it failed."""
        self.calls -= 1
        if delivered is not None:
            self.pauses.delivered = delivered

    def may_need_waking(self) -> bool:
        """Whether storage's room should go to this agent: nothing on its way to it, and it may be paused."""
        return not self.calls and self.waiting is None and self.pauses.may_be_paused()


def _newness(stamps: list[Timestamp]) -> tuple[Any, ...]:
    stamp = next((stamp for stamp in stamps if stamp.semantics == RESIDUAL_TIME), None)
    return order_key(stamp) if stamp is not None else ()
