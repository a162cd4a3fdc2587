"""Server-side continuous batching: session steps that arrive while the node is busy run together.

Every session's Inference stream submits its steps here instead of computing them itself. One
loop takes what is pending, picks a batch with :func:`plan_batch` (decode and verification steps
first, prefill chunks in the remaining token budget), runs it as one ragged forward in a worker
thread, and resolves each step. Sessions join and leave between steps; nobody waits for a batch
to finish generating. Because a driver hands its sessions' steps to a hop one after another, the
loop waits a little (``gather_ms``, cut short after ``gap_ms`` without arrivals) for the other
sessions it knows are open, instead of running a fragment of them; but once every session that
shared the first step's previous forward (its cohort: with two hops, the driver's sessions split
into groups that alternate between the hops) is back, it waits only ``cohort_gap_ms`` more, since
the other sessions are elsewhere in the chain and will not arrive soon. A session may ask to run
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
    grouped: bool = False  # came with its companions in one batched message: nobody else to wait for


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
        # cohorts: the sessions that ran in the same forward tend to come back together (a driver's group
        # in a pipeline); once all of a cohort is back, waiting longer only delays it
        self._forward_no = 0
        self._cohort_of: dict[int, int] = {}  # id(session cache) -> the forward it last ran in
        self._cohorts: dict[int, set[int]] = {}  # forward -> open sessions that last ran in it

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

    def session_closed(self, *, batching: bool, kv: SequenceKV | None = None) -> None:
        self._batching_sessions -= int(batching)
        if kv is not None:
            self._leave_cohort(id(kv))
        self._wake.set()  # one fewer session to wait for

    def _leave_cohort(self, key: int) -> None:
        cohort = self._cohort_of.pop(key, None)
        if cohort is not None:
            members = self._cohorts.get(cohort)
            if members is not None:
                members.discard(key)
                if not members:
                    del self._cohorts[cohort]

    def _record_cohort(self, batch: list[_Pending]) -> None:
        self._forward_no += 1
        keys = {id(p.item.kv) for p in batch if not p.solo}
        for key in keys:
            self._leave_cohort(key)
            self._cohort_of[key] = self._forward_no
        if keys:
            self._cohorts[self._forward_no] = keys

    def _cohort_back(self, first: _Pending, waiting: list[_Pending]) -> bool:
        """Every open session that shared ``first``'s last forward is waiting again."""
        members = self._cohorts.get(self._cohort_of.get(id(first.item.kv), -1))
        if members is None or len(members) < 2:  # a session that ran alone has no cohort to wait for
            return False
        return members <= {id(p.item.kv) for p in waiting}

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

    def submit_group(self, items: list[StepItem]) -> list[asyncio.Future[torch.Tensor]]:
        """Queue the steps of one batched message; they run as soon as the loop is free, without gathering.

        The sender already collected every step it had ready, so waiting for stragglers would only
        delay them. Steps of other sessions pending at that moment join the same forward.
        """
        if self._task is None:
            raise RuntimeError("StepBatcher.start() was not called")
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        futures: list[asyncio.Future[torch.Tensor]] = []
        for item in items:
            future: asyncio.Future[torch.Tensor] = loop.create_future()
            self._pending.append(_Pending(item, False, 0.0, now, future, grouped=True))
            futures.append(future)
        self._last_submit = now
        self._wake.set()
        return futures

    def _batchable(self) -> list[_Pending]:
        seen: set[int] = set()
        out = []
        for pending in self._pending:
            if pending.solo or id(pending.item.kv) in seen or pending.future.cancelled():
                continue
            seen.add(id(pending.item.kv))
            out.append(pending)
        return out

    def _enough(self, waiting: int, gathered_long: bool, quiet: float, gap: float, cohort_gap: float,
                first: _Pending, batchable: list[_Pending]) -> bool:
        """Stop waiting: everyone open is here, the gather time is up, arrivals stopped, or the first step's
        cohort is back (briefly quiet)."""
        if waiting >= self._batching_sessions or gathered_long or quiet >= gap:
            return True
        return quiet >= cohort_gap and self._cohort_back(first, batchable)

    async def _choose(self) -> list[_Pending]:
        first = self._pending[0]
        if first.solo or self.policy.max_seqs == 1:
            return [first]
        if first.grouped:  # a batched message: run what is here now
            batchable = self._batchable()
            if not batchable:  # cancelled meanwhile
                return [first]
            idx = plan_batch([c.item.hidden.shape[0] for c in batchable], self.policy)
            return [batchable[i] for i in idx]
        window_end = first.arrival + first.window_s  # dynamic batching: a fixed wait
        gather_end = first.arrival + self.policy.gather_ms / 1000.0
        gap = self.policy.gap_ms / 1000.0
        cohort_gap = self.policy.cohort_gap_ms / 1000.0
        while len(batchable := self._batchable()) < self.policy.max_seqs:
            waiting = len(batchable)
            now = time.monotonic()
            quiet = now - self._last_submit
            if now < window_end:
                until = window_end
            elif self._enough(waiting, now >= gather_end, quiet, gap, cohort_gap, first, batchable):
                break
            else:
                until = min(gather_end, self._last_submit + gap)
                if self._cohort_back(first, batchable):
                    until = min(until, self._last_submit + cohort_gap)
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
            self._record_cohort(batch)
            self.stats.forwards += 1
            self.stats.steps += len(batch)
            self.stats.max_batch = max(self.stats.max_batch, len(batch))
            self.stats.batch_sizes[len(batch)] = self.stats.batch_sizes.get(len(batch), 0) + 1
            for p, out in zip(batch, outputs, strict=True):
                if not p.future.done():
                    p.future.set_result(out)
