"""The node's task worker against the real RabbitMQ: streaming, typed errors, dead letters, telemetry."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aio_pika
import pytest
from aio_pika.abc import AbstractRobustConnection

from node.worker import TaskWorker
from proto import messages_pb2
from proto.common_pb2 import ErrorCode
from proto.topology import Topology
from tests.helpers_worker import (  # noqa: F401 (fixtures)
    GROUP,
    make_request,
    publish_task,
    read_telemetry,
    reference_greedy,
    reply_queue,
    routed,
    running_worker,
    tiny_engine,
    tiny_tokenizer,
)


async def stats_settle(worker: TaskWorker, **expected: int) -> None:
    """Wait until the worker's counters read ``expected``: it counts a task after its reply is published and
    the delivery settled, so a test that has just seen the reply may look a moment too early."""
    stats = worker.stats
    for _ in range(200):
        if all(getattr(stats, name) == value for name, value in expected.items()):
            return
        await asyncio.sleep(0.05)
    assert {name: getattr(stats, name) for name in expected} == expected


@pytest.fixture
async def connection(amqp_url: str) -> AsyncIterator[AbstractRobustConnection]:
    conn = await aio_pika.connect_robust(amqp_url)
    yield conn
    await conn.close()


async def dead_letters(connection: AbstractRobustConnection, topology: Topology, expect: int,
                       timeout: float = 10.0) -> list[bytes]:
    """Bodies in the namespace's dead-letter queue, once ``expect`` of them are there."""
    channel = await connection.channel()
    queue = await topology.dead_letter_spec().declare(channel)
    bodies: list[bytes] = []
    deadline = time.monotonic() + timeout
    while len(bodies) < expect and time.monotonic() < deadline:
        message = await queue.get(fail=False, no_ack=True)
        if message is None:
            await asyncio.sleep(0.05)
        else:
            bodies.append(message.body)
    await channel.close()
    return bodies


async def wait_for_chunk(replies, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not replies.chunks:
        assert not replies.results, f"expected tokens, got {replies.results[0]}"
        assert time.monotonic() < deadline, "no chunk arrived"
        await asyncio.sleep(0.01)


async def test_streams_chunks_and_result_equal_to_transformers_greedy(
    connection, topology, tiny_engine, tiny_tokenizer, tiny_model_path: Path, tmp_path: Path  # noqa: F811
) -> None:
    prompt = "The quick brown fox"
    async with reply_queue(connection, topology) as (reply_to, replies), \
            running_worker(connection, topology, tiny_engine, tiny_tokenizer, state_dir=tmp_path) as worker:
        request = make_request(topology, reply_to, request_id="r1", prompt=prompt, max_new_tokens=20)
        await publish_task(connection, topology, routed(request).SerializeToString())
        await replies.wait_results(1)
        result = replies.result_of("r1")
        assert result.ok, result.error
        expected = reference_greedy(tiny_model_path, prompt, 20)
        assert list(result.token_ids) == expected
        assert replies.tokens_of("r1") == expected  # every token was streamed, in order
        assert len(replies.chunks[0].token_ids) == 1  # the first token leaves alone, at once
        assert result.text == tiny_tokenizer.decode(expected, skip_special_tokens=True)
        assert "".join(c.text for c in replies.chunks) == result.text
        assert result.node_id == "node-a" and result.group == GROUP and result.method == "baseline"
        assert result.timing.new_tokens == 20 and result.timing.prompt_tokens == len(tiny_tokenizer.encode(prompt))
        assert 0 < result.timing.ttft_s <= result.timing.total_s
        await stats_settle(worker, completed=1)
        reports = await read_telemetry(connection, topology, expect=1)
    report = reports[0]
    assert report.request_id == "r1" and report.ok and report.node_id == "node-a"
    assert report.decision.scheduler == "test" and report.method == "baseline"
    assert report.timing.new_tokens == 20 and report.task_text == prompt
    assert report.hardware.weight_format == "fp32"


async def test_malformed_task_gets_typed_error_goes_to_dead_letters_and_next_is_served(
    connection, topology, tiny_engine, tiny_tokenizer  # noqa: F811
) -> None:
    async with reply_queue(connection, topology) as (reply_to, replies), \
            running_worker(connection, topology, tiny_engine, tiny_tokenizer) as worker:
        await publish_task(connection, topology, b"\xff\xff not a protobuf", reply_to=reply_to, correlation_id="bad1")
        await publish_task(connection, topology,
                           routed(make_request(topology, reply_to, request_id="good1")).SerializeToString())
        await replies.wait_results(2)
        bad = replies.result_of("bad1")
        assert not bad.ok and bad.error.code == ErrorCode.MALFORMED_MESSAGE
        assert replies.result_of("good1").ok
        assert await dead_letters(connection, topology, 1) == [b"\xff\xff not a protobuf"]
        assert worker.stats.dead_lettered == 1


@pytest.mark.parametrize(
    ("changes", "code"),
    [
        ({"model": "no-such-model"}, ErrorCode.UNKNOWN_MODEL),
        ({"prompt": "   "}, ErrorCode.PROMPT_EMPTY),
        ({"prompt": "word " * 2000}, ErrorCode.PROMPT_TOO_LONG),
        ({"max_new_tokens": 0}, ErrorCode.MAX_NEW_TOKENS_OUT_OF_RANGE),
        ({"max_new_tokens": 100_000}, ErrorCode.MAX_NEW_TOKENS_OUT_OF_RANGE),
        ({"budget": -1.0}, ErrorCode.BUDGET_INVALID),
        ({"request_id": "has space"}, ErrorCode.INVALID_REQUEST),
    ],
)
async def test_invalid_request_gets_typed_error_and_is_dead_lettered(
    connection, topology, tiny_engine, tiny_tokenizer, changes: dict, code: int  # noqa: F811
) -> None:
    async with reply_queue(connection, topology) as (reply_to, replies), \
            running_worker(connection, topology, tiny_engine, tiny_tokenizer):
        request = make_request(topology, reply_to, request_id="bad")
        for key, value in changes.items():
            setattr(request, key, value)
        await publish_task(connection, topology, routed(request).SerializeToString())
        await publish_task(connection, topology,
                           routed(make_request(topology, reply_to, request_id="next")).SerializeToString())
        await replies.wait_results(2)
        bad = replies.result_of(request.request_id)
        assert not bad.ok and bad.error.code == code and bad.finish_reason == "error"
        assert bad.error.message
        assert not any(c.request_id == request.request_id for c in replies.chunks)
        assert replies.result_of("next").ok
        dead = await dead_letters(connection, topology, 1)
        assert messages_pb2.RoutedTask.FromString(dead[0]).request.request_id == request.request_id


async def test_request_past_its_deadline_is_not_computed(
    connection, topology, tiny_engine, tiny_tokenizer  # noqa: F811
) -> None:
    async with reply_queue(connection, topology) as (reply_to, replies), \
            running_worker(connection, topology, tiny_engine, tiny_tokenizer) as worker:
        late = make_request(topology, reply_to, request_id="late", deadline_unix=time.time() - 1)
        await publish_task(connection, topology, routed(late).SerializeToString())
        await replies.wait_results(1)
        result = replies.result_of("late")
        assert not result.ok and result.error.code == ErrorCode.DEADLINE_EXCEEDED
        assert replies.chunks == []
        await stats_settle(worker, completed=0, failed=1)
        assert len(await dead_letters(connection, topology, 1)) == 1


async def test_task_answered_before_a_restart_is_not_computed_again(
    connection, topology, tiny_engine, tiny_tokenizer, tmp_path: Path  # noqa: F811
) -> None:
    async with reply_queue(connection, topology) as (reply_to, replies):
        task = routed(make_request(topology, reply_to, request_id="once")).SerializeToString()
        async with running_worker(connection, topology, tiny_engine, tiny_tokenizer, state_dir=tmp_path):
            await publish_task(connection, topology, task)
            await replies.wait_results(1)
        chunks_before = len(replies.chunks)
        # the same node restarts (same state dir) and the task comes again, as after a lost ack
        async with running_worker(connection, topology, tiny_engine, tiny_tokenizer, state_dir=tmp_path) as worker:
            await publish_task(connection, topology, task)
            for _ in range(100):
                if worker.stats.deduplicated:
                    break
                await asyncio.sleep(0.05)
            assert worker.stats.deduplicated == 1 and worker.stats.completed == 0
        assert len(replies.results) == 1 and len(replies.chunks) == chunks_before


async def test_another_node_skips_a_task_answered_elsewhere_via_telemetry(
    connection, topology, tiny_engine, tiny_tokenizer, tmp_path: Path  # noqa: F811
) -> None:
    async with reply_queue(connection, topology) as (reply_to, replies):
        task = routed(make_request(topology, reply_to, request_id="elsewhere")).SerializeToString()
        async with running_worker(connection, topology, tiny_engine, tiny_tokenizer, state_dir=tmp_path / "a"):
            await publish_task(connection, topology, task)
            await replies.wait_results(1)
            await read_telemetry(connection, topology, expect=1)
        async with running_worker(connection, topology, tiny_engine, tiny_tokenizer, state_dir=tmp_path / "b",
                                  node_id="node-b", telemetry_lookback_s=600) as worker:
            await publish_task(connection, topology, task)
            for _ in range(100):
                if worker.stats.deduplicated:
                    break
                await asyncio.sleep(0.05)
            assert worker.stats.deduplicated == 1
        assert len(replies.results) == 1


class _BrokenEngine:
    methods = ("baseline",)

    def __init__(self) -> None:
        self.calls = 0

    async def generate(self, request):  # type: ignore[no-untyped-def]
        self.calls += 1
        raise RuntimeError("boom")
        yield 0  # an async generator

    async def close(self) -> None:
        return None


async def test_engine_failure_is_retried_then_answered_with_node_failure(
    connection, topology, tiny_tokenizer  # noqa: F811
) -> None:
    engine = _BrokenEngine()
    async with reply_queue(connection, topology) as (reply_to, replies), \
            running_worker(connection, topology, engine, tiny_tokenizer) as worker:
        await publish_task(connection, topology,
                           routed(make_request(topology, reply_to, request_id="poison")).SerializeToString())
        await replies.wait_results(1)
        result = replies.result_of("poison")
        assert not result.ok and result.error.code == ErrorCode.NODE_FAILURE
        assert engine.calls == 5 and worker.stats.requeued == 4
        assert len(await dead_letters(connection, topology, 1)) == 1


async def test_drain_requeues_a_task_that_cannot_finish_in_the_grace_period(
    connection, topology, tiny_engine, tiny_tokenizer  # noqa: F811
) -> None:
    async with reply_queue(connection, topology) as (reply_to, replies):
        long = routed(make_request(topology, reply_to, request_id="long", max_new_tokens=300))
        async with running_worker(connection, topology, tiny_engine, tiny_tokenizer) as worker:
            await publish_task(connection, topology, long.SerializeToString())
            await wait_for_chunk(replies)
            await worker.drain(0.0)
            assert worker.stats.requeued == 1
        assert replies.results == []
        # the task is back in the queue: the next node answers it, and the stream restarts at index 0
        async with running_worker(connection, topology, tiny_engine, tiny_tokenizer, node_id="node-b"):
            await replies.wait_results(1, timeout=60)
        result = replies.result_of("long")
        assert result.ok and result.node_id == "node-b" and len(result.token_ids) == 300


async def test_drain_lets_a_short_task_finish(connection, topology, tiny_engine, tiny_tokenizer) -> None:  # noqa: F811
    async with reply_queue(connection, topology) as (reply_to, replies):
        async with running_worker(connection, topology, tiny_engine, tiny_tokenizer) as worker:
            await publish_task(connection, topology, routed(
                make_request(topology, reply_to, request_id="short", max_new_tokens=100)).SerializeToString())
            await wait_for_chunk(replies)
            await worker.drain(30.0)
            assert worker.stats.completed == 1 and worker.stats.requeued == 0
        assert replies.result_of("short").ok


async def test_missing_reply_queue_dead_letters_the_task(
    connection, topology, tiny_engine, tiny_tokenizer  # noqa: F811
) -> None:
    async with running_worker(connection, topology, tiny_engine, tiny_tokenizer) as worker:
        orphan = make_request(topology, topology.reply_queue("nobody-here"), request_id="orphan")
        await publish_task(connection, topology, routed(orphan).SerializeToString())
        assert len(await dead_letters(connection, topology, 1)) == 1
        await stats_settle(worker, dead_lettered=1, completed=0)


class _BuiltForOneMethod:
    """An engine whose options are fixed at build time (as vLLM's are): it runs prefix_caching only."""

    methods = ("prefix_caching",)

    def __init__(self, inner) -> None:
        self._inner = inner
        self.asked: list[str] = []

    async def generate(self, request):
        self.asked.append(request.method)
        async for token in self._inner.generate(request):
            yield token

    async def close(self) -> None:
        return None


async def test_an_engine_built_for_one_method_runs_every_task_that_way_and_reports_it(
    connection, topology, tiny_engine, tiny_tokenizer, tiny_model_path: Path  # noqa: F811
) -> None:
    engine = _BuiltForOneMethod(tiny_engine)
    async with reply_queue(connection, topology) as (reply_to, replies), \
            running_worker(connection, topology, engine, tiny_tokenizer):
        for rid, method in (("asked-baseline", "baseline"), ("asked-own", "prefix_caching")):
            request = make_request(topology, reply_to, request_id=rid, max_new_tokens=6)
            await publish_task(connection, topology, routed(request, method=method).SerializeToString())
        await replies.wait_results(2)
        reports = await read_telemetry(connection, topology, expect=2)
    expected = reference_greedy(tiny_model_path, "def parse(text):", 6)
    for rid in ("asked-baseline", "asked-own"):
        result = replies.result_of(rid)
        assert result.ok and list(result.token_ids) == expected
        assert result.method == "prefix_caching"  # the method that ran, not the one asked for
    assert engine.asked == ["prefix_caching", "prefix_caching"]
    by_id = {r.request_id: r for r in reports}
    assert by_id["asked-baseline"].decision.method == "baseline"
    assert by_id["asked-baseline"].method == "prefix_caching"
