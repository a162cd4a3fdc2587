"""Server-side continuous batching: session steps that arrive while the node is busy run together.

Every session's Inference stream submits its steps here instead of computing them itself. One
loop takes what is pending, picks a batch with :func:`plan_batch` (decode and verification steps
first, prefill chunks in the remaining token budget), runs it as one ragged forward in a worker
thread, and resolves each step. Sessions join and leave between steps; nobody waits for a batch
to finish generating. Because a driver hands its sessions' steps to a hop one after another, the
loop waits a little (``gather_ms``, cut short after ``gap_ms`` without arrivals) for the other
sessions it knows are open, instead of running a fragment of them. A session may ask to run
alone (the baseline method) or to wait for companions for a few milliseconds first (dynamic batching).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from node.accel.batching import BatchPolicy, plan_batch
from node.accel.executor import BlockExecutor, StepItem
from node.accel.kv import SequenceKV

logger = logging.getLogger(__name__)


@dataclass
class _Pending:
    item: StepItem
    solo: bool
    window_s: float
    arrival: float
    future: asyncio.Future[torch.Tensor]


@dataclass
class BatcherStats:
    forwards: int = 0  # batched forwards run
    steps: int = 0  # session steps served
    max_batch: int = 0  # largest number of sessions in one forward
    batch_sizes: dict[int, int] = field(default_factory=dict)  # sessions per forward -> count
    forward_s: float = 0.0  # time spent in forwards
    gather_s: float = 0.0  # time spent waiting for companions before forwards (continuous/dynamic batching)
    forward_s_by_size: dict[int, float] = field(default_factory=dict)  # sessions per forward -> time in them


class StepBatcher:
    """Schedules the steps of all sessions of one block server onto its executor."""

    def __init__(self, executor: BlockExecutor, policy: BatchPolicy) -> None:
        self.executor = executor
        self.policy = policy
        self.stats = BatcherStats()
        self._pending: list[_Pending] = []
        self._wake = asyncio.Event()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dinet-blocks")
        self._task: asyncio.Task[None] | None = None
        self._batching_sessions = 0  # open sessions that share forwards (their steps are worth waiting for)
        self._last_submit = 0.0

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="dinet-step-batcher")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for pending in self._pending:
            if not pending.future.done():
                pending.future.set_exception(RuntimeError("block server is shutting down"))
        self._pending.clear()
        self._pool.shutdown(wait=True)

    def session_opened(self, *, batching: bool) -> None:
        self._batching_sessions += int(batching)

    def session_closed(self, *, batching: bool) -> None:
        self._batching_sessions -= int(batching)
        self._wake.set()  # one fewer session to wait for

    def close_nowait(self) -> None:
        """Cancel the loop and fail pending steps without awaiting (a synchronous owner's shutdown)."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
        for pending in self._pending:
            if not pending.future.done():
                pending.future.set_exception(RuntimeError("block server is shutting down"))
        self._pending.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def submit(
        self, kv: SequenceKV, hidden: torch.Tensor, *, solo: bool = False, window_ms: float | None = None
    ) -> torch.Tensor:
        """Run ``hidden`` [n_new, hidden] of one session through the blocks; returns [n_new, hidden]."""
        if self._task is None:
            raise RuntimeError("StepBatcher.start() was not called")
        window = self.policy.window_ms if window_ms is None else window_ms
        future: asyncio.Future[torch.Tensor] = asyncio.get_running_loop().create_future()
        self._pending.append(
            _Pending(StepItem(kv, hidden), solo, window / 1000.0, time.monotonic(), future)
        )
        self._last_submit = time.monotonic()
        self._wake.set()
        return await future

    def _batchable(self) -> list[_Pending]:
        seen: set[int] = set()
        out = []
        for pending in self._pending:
            if pending.solo or id(pending.item.kv) in seen or pending.future.cancelled():
                continue
            seen.add(id(pending.item.kv))
            out.append(pending)
        return out

    async def _choose(self) -> list[_Pending]:
        first = self._pending[0]
        if first.solo or self.policy.max_seqs == 1:
            return [first]
        window_end = first.arrival + first.window_s  # dynamic batching: a fixed wait
        gather_end = first.arrival + self.policy.gather_ms / 1000.0
        gap = self.policy.gap_ms / 1000.0
        while (waiting := len(self._batchable())) < self.policy.max_seqs:
            now = time.monotonic()
            if now < window_end:
                until = window_end
            elif waiting >= self._batching_sessions or now >= gather_end or now - self._last_submit >= gap:
                break
            else:
                until = min(gather_end, self._last_submit + gap)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.0, until - now))
        candidates = self._batchable()
        if first not in candidates:  # cancelled while waiting
            return [first]
        idx = plan_batch([c.item.hidden.shape[0] for c in candidates], self.policy)
        return [candidates[i] for i in idx]

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._pending:
                self._wake.clear()
                await self._wake.wait()
            began = time.monotonic()
            batch = await self._choose()
            chose = time.monotonic()
            self.stats.gather_s += chose - began
            chosen = {id(p) for p in batch}
            self._pending = [p for p in self._pending if id(p) not in chosen]
            batch = [p for p in batch if not p.future.cancelled()]
            if not batch:
                continue
            try:
                outputs = await loop.run_in_executor(self._pool, self.executor.forward, [p.item for p in batch])
            except Exception as exc:  # a bad step fails its batch, never the loop
                logger.exception("batched forward of %d steps failed", len(batch))
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(exc)
                continue
            took = time.monotonic() - chose
            self.stats.forward_s += took
            self.stats.forward_s_by_size[len(batch)] = self.stats.forward_s_by_size.get(len(batch), 0.0) + took
            self.stats.forwards += 1
            self.stats.steps += len(batch)
            self.stats.max_batch = max(self.stats.max_batch, len(batch))
            self.stats.batch_sizes[len(batch)] = self.stats.batch_sizes.get(len(batch), 0) + 1
            for p, out in zip(batch, outputs, strict=True):
                if not p.future.done():
                    p.future.set_result(out)
