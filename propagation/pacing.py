"""An agent's tasks publishing on one schedule, taking turns, paused while storage is full.

The ``num_tasks`` tasks share one grid: task ``i`` is due at ``start + (k + i / num_tasks) / rate``.
Started together they would publish in bursts, each sample of a burst waiting for the
others; on the grid they take turns within each period, after a pause too. A task that
falls behind catches up by publishing at once, up to ``MAX_CATCH_UP_S`` of lag; beyond
that the missed slots are skipped and counted.
"""

from __future__ import annotations

import asyncio
import math
from typing import AsyncIterator, Callable

MAX_CATCH_UP_S = 0.1


class Pacer:
    """The slots of ``num_tasks`` tasks at ``rate`` Hz each, held back while paused."""

    def __init__(self, rate: float, num_tasks: int, on_slow: Callable[[], None] = lambda: None) -> None:
        """``on_slow`` runs when slots are skipped."""
        self.period = 1.0 / rate
        self.num_tasks = num_tasks
        self.room = asyncio.Event()  # set while storage has room
        self.room.set()
        self.missed_slots = 0
        self._on_slow = on_slow
        self._start: float | None = None

    async def slots(self, task_id: int) -> AsyncIterator[None]:
        """Yields each time task ``task_id`` may publish, aiming at absolute deadlines.

        Sleeping ``1/rate`` after each publish would add the publish time and the
        sleep's overshoot to every period and run slow.
        """
        loop = asyncio.get_running_loop()
        if self._start is None:
            self._start = loop.time()
        deadline = self._start + self.period * task_id / self.num_tasks
        while True:
            await asyncio.sleep(max(0.0, deadline - loop.time()))
            if not self.room.is_set():
                await self.room.wait()
                # The first slot of this task's own grid from now on: its turn.
                deadline += self.period * math.ceil((loop.time() - deadline) / self.period)
                continue
            if (lag := loop.time() - deadline) > MAX_CATCH_UP_S:
                skipped = int(lag / self.period)
                self.missed_slots += skipped
                deadline += skipped * self.period
                self._on_slow()
            yield
            deadline += self.period
