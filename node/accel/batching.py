"""Pure scheduling policies: which pending steps run together, how a prompt is chunked, when to stop waiting.

Kept free of I/O so they can be tested exactly; :mod:`node.accel.batcher` applies them to live
sessions on a block server, and the chain driver applies :func:`plan_chunks`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class BatchPolicy:
    """How a block server forms one forward out of pending session steps."""

    max_seqs: int = 16  # sessions per forward (1 = no batching: every step runs alone)
    max_tokens: int = 256  # new tokens per forward; decode steps always fit, prefill chunks share the rest
    window_ms: float = 0.0  # dynamic batching: wait this long after the first step for companions (0 = never)
    gather_ms: float = 40.0  # continuous batching: longest wait for the other sessions open on this node
    gap_ms: float = 5.0  # ...but stop waiting once no step has arrived for this long
    cohort_gap_ms: float = 1.0  # ...or for this long once every session of the first step's last forward is back

    def __post_init__(self) -> None:
        waits = (self.window_ms, self.gather_ms, self.gap_ms, self.cohort_gap_ms)
        if self.max_seqs < 1 or self.max_tokens < 1 or min(waits) < 0:
            raise ValueError("max_seqs and max_tokens must be >= 1 and the waits >= 0")


def plan_batch(token_counts: Sequence[int], policy: BatchPolicy) -> list[int]:
    """Indices (in arrival order) of the pending steps to run in the next forward.

    Continuous batching at the iteration level: short steps (decode, speculative verification)
    go first, in arrival order, so a long prefill never stalls the sessions that are decoding;
    longer steps (prefill chunks) fill the remaining token budget. The oldest step always runs,
    even alone over budget, so nothing starves.
    """
    if not token_counts:
        return []
    chosen = [0]
    budget = policy.max_tokens - token_counts[0]
    short = [i for i in range(1, len(token_counts)) if token_counts[i] <= 8]
    long = [i for i in range(1, len(token_counts)) if token_counts[i] > 8]
    for i in [*short, *long]:
        if len(chosen) >= policy.max_seqs:
            break
        if token_counts[i] <= budget:
            chosen.append(i)
            budget -= token_counts[i]
    return sorted(chosen)


def plan_chunks(n_tokens: int, chunk: int) -> list[tuple[int, int]]:
    """Split [0, n_tokens) into consecutive [start, end) chunks of at most ``chunk`` tokens (0 = one chunk)."""
    if n_tokens < 0 or chunk < 0:
        raise ValueError("n_tokens and chunk must be non-negative")
    if n_tokens == 0:
        return []
    if chunk == 0:
        return [(0, n_tokens)]
    return [(s, min(s + chunk, n_tokens)) for s in range(0, n_tokens, chunk)]


class DynamicBatchCollector(Generic[T]):
    """Collects items until ``max_items`` are waiting or ``window_s`` passed since the first one arrived."""

    def __init__(self, *, max_items: int, window_s: float) -> None:
        if max_items < 1 or window_s < 0:
            raise ValueError("max_items must be >= 1 and window_s >= 0")
        self.max_items = max_items
        self.window_s = window_s
        self._items: list[T] = []
        self._changed = asyncio.Event()

    def put(self, item: T) -> None:
        self._items.append(item)
        self._changed.set()

    async def collect(self) -> list[T]:
        """Wait for at least one item, then for companions; returns up to ``max_items`` in arrival order."""
        while not self._items:
            self._changed.clear()
            await self._changed.wait()
        deadline = time.monotonic() + self.window_s
        while len(self._items) < self.max_items:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                break
        batch, self._items = self._items[: self.max_items], self._items[self.max_items :]
        return batch
