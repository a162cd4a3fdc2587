"""Batching policies and the ragged executor: sessions of different lengths in one forward, computed exactly."""

from __future__ import annotations

import asyncio

import pytest
import torch

from node.accel.batching import BatchPolicy, DynamicBatchCollector, plan_batch, plan_chunks
from node.accel.executor import BlockExecutor, StepItem


def test_plan_batch_puts_decode_steps_first_and_fills_the_token_budget_with_prefill():
    policy = BatchPolicy(max_seqs=4, max_tokens=40)
    # oldest is a 32-token prefill chunk, then decodes and another chunk
    assert plan_batch([32, 1, 32, 1, 1], policy) == [0, 1, 3, 4]
    assert plan_batch([1, 32, 1], BatchPolicy(max_seqs=16, max_tokens=40)) == [0, 1, 2]
    assert plan_batch([100], policy) == [0]  # the oldest always runs, even over budget
    assert plan_batch([1] * 10, policy) == [0, 1, 2, 3]
    assert plan_batch([], policy) == []
    with pytest.raises(ValueError):
        BatchPolicy(max_seqs=0)


def test_plan_chunks_covers_the_prompt_in_order():
    assert plan_chunks(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert plan_chunks(10, 0) == [(0, 10)]
    assert plan_chunks(0, 4) == []
    with pytest.raises(ValueError):
        plan_chunks(-1, 4)


async def test_dynamic_batch_collector_waits_for_the_window_or_the_size_limit():
    collector: DynamicBatchCollector[int] = DynamicBatchCollector(max_items=3, window_s=0.05)
    for i in range(5):
        collector.put(i)
    assert await collector.collect() == [0, 1, 2]  # full: no waiting
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await collector.collect() == [3, 4]  # window expires with 2 items
    assert loop.time() - started >= 0.04
    loop.call_later(0.01, collector.put, 7)
    assert await collector.collect() == [7]  # waits for a first item


def test_ragged_batch_matches_sessions_run_one_by_one(tiny_model_path):
    executor = BlockExecutor.load(tiny_model_path, 0, 4)
    torch.manual_seed(0)
    prompts = [torch.randn(n, executor.hidden_size) for n in (5, 1, 12)]
    # alone
    alone_caches = [executor.new_cache(capacity=2) for _ in prompts]  # capacity 2 forces buffer growth
    alone = [executor.forward([StepItem(c, p)])[0] for c, p in zip(alone_caches, prompts, strict=True)]
    # together: a prefill of different lengths, then a mixed step (decode + 3-token verification)
    caches = [executor.new_cache() for _ in prompts]
    together = executor.forward([StepItem(c, p) for c, p in zip(caches, prompts, strict=True)])
    for a, b in zip(alone, together, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    nxt = [torch.randn(1, executor.hidden_size), torch.randn(3, executor.hidden_size)]
    alone2 = [executor.forward([StepItem(alone_caches[i], nxt[i])])[0] for i in range(2)]
    together2 = executor.forward([StepItem(caches[i], nxt[i]) for i in range(2)])
    for a, b in zip(alone2, together2, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert [c.length for c in caches] == [6, 4, 12]
    with pytest.raises(ValueError):
        executor.forward([StepItem(caches[0], nxt[0]), StepItem(caches[0], nxt[0])])


def test_truncate_rolls_a_session_back_exactly(tiny_model_path):
    executor = BlockExecutor.load(tiny_model_path, 0, 2)
    torch.manual_seed(1)
    prefix, rejected, real = (torch.randn(n, executor.hidden_size) for n in (6, 3, 2))
    rolled = executor.new_cache()
    executor.forward([StepItem(rolled, prefix)])
    executor.forward([StepItem(rolled, rejected)])
    rolled.truncate(6)
    clean = executor.new_cache()
    executor.forward([StepItem(clean, prefix)])
    torch.testing.assert_close(
        executor.forward([StepItem(rolled, real)])[0], executor.forward([StepItem(clean, real)])[0]
    )
    with pytest.raises(ValueError):
        rolled.truncate(99)


async def test_step_batcher_runs_a_returning_cohort_without_waiting_for_sessions_elsewhere(tiny_model_path):
    from node.accel.batcher import StepBatcher

    executor = BlockExecutor.load(tiny_model_path, 0, 2)
    # waits so long that only the cohort rule can start a forward before the sessions elsewhere arrive
    policy = BatchPolicy(max_seqs=8, gather_ms=60_000, gap_ms=60_000, cohort_gap_ms=1.0)
    batcher = StepBatcher(executor, policy)
    await batcher.start()
    try:
        caches = [executor.new_cache() for _ in range(4)]
        for _ in caches:
            batcher.session_opened(batching=True)
        step = [torch.randn(1, executor.hidden_size) for _ in caches]
        # all four run together once (everyone open is waiting)
        await asyncio.wait_for(asyncio.gather(*(batcher.submit(c, h) for c, h in zip(caches, step, strict=True))), 30)
        assert batcher.stats.batch_sizes == {4: 1}
        # two of them close; the other two come back without the two that left: no one else to wait for
        for c in caches[2:]:
            batcher.session_closed(batching=True, kv=c)
        await asyncio.wait_for(asyncio.gather(*(batcher.submit(caches[i], step[i]) for i in range(2))), 30)
        assert batcher.stats.batch_sizes == {4: 1, 2: 1}
        # a new session opens and is elsewhere (no step yet): the returning cohort of two still runs at once
        batcher.session_opened(batching=True)
        await asyncio.wait_for(asyncio.gather(*(batcher.submit(caches[i], step[i]) for i in range(2))), 30)
        assert batcher.stats.batch_sizes == {4: 1, 2: 2}
    finally:
        await batcher.close()
