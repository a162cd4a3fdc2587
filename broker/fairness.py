"""Weighted-fair admission across priority classes.

Each priority class has its own consumer (and prefetch window), so messages of every
class are waiting locally while the broker is busy. :class:`WeightedFairGate` hands
out a fixed number of routing slots (publishes awaiting their confirm); when slots
are short it serves the waiting classes by smooth weighted round robin: ``high``
gets most of them, and ``batch`` still gets its share, so it is never starved.
"""

from __future__ import annotations

import asyncio
from collections import deque


class WeightedFairGate:
    """``capacity`` slots shared by priority classes with integer ``weights``."""

    def __init__(self, capacity: int, weights: dict[str, int]) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self._free = capacity
        self._weights = dict(weights)
        self._waiters: dict[str, deque[asyncio.Future[None]]] = {p: deque() for p in weights}
        self._current: dict[str, int] = dict.fromkeys(weights, 0)
        self.granted: dict[str, int] = dict.fromkeys(weights, 0)  # slots handed out, per class

    @property
    def waiting(self) -> int:
        return sum(len(q) for q in self._waiters.values())

    async def acquire(self, priority: str) -> None:
        if self._free > 0 and not self.waiting:
            self._free -= 1
            self.granted[priority] += 1
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters[priority].append(future)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release()  # the slot reached us as we were cancelled: pass it on
            else:
                self._waiters[priority].remove(future)
            raise
        self.granted[priority] += 1

    def release(self) -> None:
        while True:
            priority = self._pick()
            if priority is None:
                self._free += 1
                return
            future = self._waiters[priority].popleft()
            if not future.done():
                future.set_result(None)
                return

    def _pick(self) -> str | None:
        """Smooth weighted round robin over the classes that have waiters."""
        ready = [p for p, q in self._waiters.items() if q]
        if not ready:
            return None
        if len(ready) == 1:
            return ready[0]
        total = 0
        for p in ready:
            self._current[p] += self._weights[p]
            total += self._weights[p]
        best = max(ready, key=lambda p: self._current[p])
        self._current[best] -= total
        return best
