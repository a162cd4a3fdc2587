"""The reputation fence against the real RabbitMQ: a node judged below the threshold stops consuming its group
queue (the healthy node of the group gets every later task), comes back when the evidence decays, and no task
is lost or nacked on the way. The evidence is what the brokers' ledger counts (broker/reputation.py): a
broker's RoutingRecord joined with the agent's OutcomeReport naming the node, published here to the stream.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractRobustConnection
from hivemind.utils.crypto import RSAPrivateKey

from agent.client import Agent
from broker.config import BrokerConfig, ReputationConfig
from broker.service import BrokerService
from node.worker import TaskWorker
from proto import errors, messages_pb2
from proto.common_pb2 import ErrorCode
from proto.result_signing import ResultSigner, answer_digest
from proto.telemetry import OUTCOME_REPORT, ROUTING_RECORD
from proto.topology import Topology
from tests.helpers_worker import (  # noqa: F401 (fixtures)
    GROUP,
    Replies,
    make_request,
    publish_task,
    reply_queue,
    routed,
    running_worker,
    tiny_engine,
    tiny_tokenizer,
)

CHECK_S = 0.2  # the fence re-reads the ledger this often in these tests
FAILURES = 16  # prior worth 2 successes: 16 failures keep a node out for log2(16/2) = 3 half-lives
_ids = itertools.count()


@pytest.fixture
async def connection(amqp_url: str) -> AsyncIterator[AbstractRobustConnection]:
    conn = await aio_pika.connect_robust(amqp_url)
    yield conn
    await conn.close()


async def sink(connection: AbstractRobustConnection, topology: Topology, node_id: str, *, failures: int,
               signer: ResultSigner | None = None) -> float:
    """Publish ``failures`` requests that ``node_id`` answered with NODE_FAILURE, as broker and agent record
    them (signed with ``signer``, by default the key the test's workers sign with, as the node's own answers
    would be); returns their event time (the node stays below 0.5 for log2(failures / 2) half-lives after it)."""
    signer = signer or ResultSigner.process_wide()
    channel = await connection.channel(publisher_confirms=True)
    at = time.time()
    try:
        stream = await topology.telemetry_spec().declare(channel)
        for _ in range(failures):
            rid = f"sunk-{next(_ids)}"
            record = messages_pb2.RoutingRecord(
                request_id=rid, agent_id="judge", model="tiny",
                decision=messages_pb2.RoutingDecision(group=GROUP, routed_at=at, broker_id="b-test"),
            )
            outcome = messages_pb2.OutcomeReport(
                request_id=rid, node_id=node_id, group=GROUP, answered=True, ok=False,
                error_code=ErrorCode.NODE_FAILURE, agent_id="judge", ttft_s=0.0, total_s=0.5, observed_at=at,
                answer_digest=answer_digest((), "", "error"), signer_key=signer.public_key,
            )
            outcome.signature = signer.sign_fields(
                request_id=rid, node_id=node_id, group=GROUP, ok=False, error_code=ErrorCode.NODE_FAILURE,
                digest=outcome.answer_digest)
            for kind, message in ((ROUTING_RECORD, record), (OUTCOME_REPORT, outcome)):
                await channel.default_exchange.publish(
                    aio_pika.Message(message.SerializeToString(), type=kind,
                                     delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                    routing_key=stream.name, mandatory=True,
                )
    finally:
        await channel.close()
    return at


async def until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for: {what}"
        await asyncio.sleep(0.02)


async def send(connection: AbstractRobustConnection, topology: Topology, reply_to: str, rids: list[str],
               max_new_tokens: int = 4) -> None:
    for rid in rids:
        request = make_request(topology, reply_to, request_id=rid, max_new_tokens=max_new_tokens)
        await publish_task(connection, topology, routed(request).SerializeToString())


async def publish_expiring(connection: AbstractRobustConnection, topology: Topology, task: messages_pb2.RoutedTask,
                           *, ttl_s: float) -> None:
    """A routed task with a per-message TTL, as the broker publishes one whose request has a deadline."""
    channel = await connection.channel(publisher_confirms=True)
    try:
        await channel.default_exchange.publish(
            aio_pika.Message(task.SerializeToString(), expiration=ttl_s, correlation_id=task.request.request_id,
                             delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            routing_key=topology.group_queue(GROUP), mandatory=True,
        )
    finally:
        await channel.close()


def answered_by(replies: Replies, rids: list[str]) -> list[str]:
    """The node that answered each request (exactly one result per request, each one ok)."""
    results = [replies.result_of(rid) for rid in rids]
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    return [r.node_id for r in results]


def assert_nothing_lost(replies: Replies, sent: list[str], *workers: TaskWorker) -> None:
    assert sorted(r.request_id for r in replies.results) == sorted(sent)  # one answer per request, no more
    for worker in workers:
        assert worker.stats.requeued == 0 and worker.stats.dead_lettered == 0, worker.stats


class Gated:
    """The tiny engine, holding every generation after its first token until ``gate`` opens: a task in hand."""

    methods = ("baseline",)

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.gate = asyncio.Event()
        self.holding = 0

    async def generate(self, request: Any) -> AsyncIterator[int]:
        first = True
        async for token in self._inner.generate(request):
            yield token
            if first and not self.gate.is_set():
                self.holding += 1
                await self.gate.wait()
                self.holding -= 1
            first = False

    async def close(self) -> None:
        return None


async def test_fenced_node_leaves_its_group_queue_to_the_healthy_node_then_comes_back(
    connection, topology, tiny_engine, tiny_tokenizer  # noqa: F811
) -> None:
    reputation = ReputationConfig(half_life_s=4.0)  # fenced for 3 half-lives: 12 s after the evidence
    gated = Gated(tiny_engine)
    async with reply_queue(connection, topology) as (reply_to, replies), \
            running_worker(connection, topology, gated, tiny_tokenizer, node_id="node-a",
                           reputation=reputation, fence_check_s=CHECK_S) as bad:
        assert not bad.fenced  # a new node gets the prior
        held = ["held"]  # node-a holds this task (one token streamed, the rest gated) when the fence falls
        await send(connection, topology, reply_to, held, max_new_tokens=8)
        await until(lambda: gated.holding == 1, "node-a has the task in hand")
        async with running_worker(connection, topology, tiny_engine, tiny_tokenizer, node_id="node-b",
                                  reputation=reputation, fence_check_s=CHECK_S) as good:
            await sink(connection, topology, "node-a", failures=FAILURES)
            await until(lambda: bad.fenced, "node-a fences itself")
            assert not good.fenced and bad.busy == 1
            # every later task goes to the healthy node
            fenced_phase = [f"while-fenced-{i}" for i in range(6)]
            await send(connection, topology, reply_to, fenced_phase)
            await replies.wait_results(len(fenced_phase), timeout=20)
            assert bad.fenced, "the fence lifted before the check ended: the evidence decayed too soon for this test"
            assert answered_by(replies, fenced_phase) == ["node-b"] * len(fenced_phase)
            # the task in hand finishes where it was, neither requeued nor nacked
            gated.gate.set()
            await replies.wait_results(len(held) + len(fenced_phase), timeout=20)
            assert answered_by(replies, held) == ["node-a"]
            # decay brings node-a back over the threshold: it consumes again and gets its share
            await until(lambda: not bad.fenced, "the fence lifts as the evidence decays", timeout=30)
            after = [f"after-{i}" for i in range(8)]
            await send(connection, topology, reply_to, after)
            await replies.wait_results(len(held) + len(fenced_phase) + len(after), timeout=30)
            assert "node-a" in answered_by(replies, after)
            assert_nothing_lost(replies, held + fenced_phase + after, bad, good)


async def test_only_node_of_its_group_fences_itself_and_loses_nothing(
    amqp_url: str, connection, topology, tiny_engine, tiny_tokenizer  # noqa: F811
) -> None:
    """Alone in its group, a fenced node leaves the queued tasks where they are (answered when it is back), a
    queued task whose deadline passes is answered DEADLINE_EXCEEDED by the brokers' dead-letter watcher, and a
    broker with the same table refuses new requests with NO_ROUTE, which the agent hears at once."""
    reputation = ReputationConfig(half_life_s=4.0)  # fenced for 12 s after the evidence
    async with reply_queue(connection, topology) as (reply_to, replies), \
            running_worker(connection, topology, tiny_engine, tiny_tokenizer, node_id="node-a",
                           reputation=reputation, fence_check_s=CHECK_S) as only:
        await sink(connection, topology, "node-a", failures=FAILURES)
        await until(lambda: only.fenced, "node-a fences itself")
        config = BrokerConfig(amqp_url=amqp_url, namespace=topology.namespace, static_groups={GROUP: ("tiny",)},
                              reputation=reputation)
        async with BrokerService(config), Agent(amqp_url, namespace=topology.namespace) as agent:
            generation = agent.generate(model="tiny", prompt="anyone?", max_new_tokens=4, timeout=10)
            with pytest.raises(errors.NoRouteError, match="below the reputation threshold"):
                await generation.result()
            # a task with a deadline waiting in the fenced group's queue (TTL = its deadline, as brokers set it)
            expiring = make_request(topology, reply_to, request_id="expires", deadline_unix=time.time() + 1.0)
            await publish_expiring(connection, topology, routed(expiring), ttl_s=1.0)
            waiting = [f"queued-{i}" for i in range(3)]
            await send(connection, topology, reply_to, waiting)
            await replies.wait_results(1, timeout=15)
            late = replies.result_of("expires")
            assert not late.ok and late.error.code == ErrorCode.DEADLINE_EXCEEDED
        assert only.fenced and only.busy == 0 and only.stats.completed == only.stats.failed == 0
        channel = await connection.channel()
        queue = await topology.group_queue_spec(GROUP).declare(channel)
        assert queue.declaration_result.message_count == len(waiting)  # still queued: nothing nacked or dropped
        await channel.close()
        await until(lambda: not only.fenced, "the fence lifts as the evidence decays", timeout=30)
        await replies.wait_results(1 + len(waiting), timeout=30)
        assert answered_by(replies, waiting) == ["node-a"] * len(waiting)
        assert_nothing_lost(replies, ["expires", *waiting], only)


async def test_a_node_started_below_the_threshold_takes_no_task_before_its_first_verdict(
    connection, topology, tiny_engine, tiny_tokenizer  # noqa: F811
) -> None:
    """The replay comes first: a node restarted while sunk is fenced from its first moment, and a task waiting in
    its group queue stays there (a drain of this fenced node requeues nothing, since it holds nothing)."""
    await sink(connection, topology, "node-a", failures=FAILURES)
    async with reply_queue(connection, topology) as (reply_to, replies):
        await send(connection, topology, reply_to, ["waiting"])
        async with running_worker(connection, topology, tiny_engine, tiny_tokenizer, node_id="node-a",
                                  reputation=ReputationConfig(half_life_s=60.0), fence_check_s=CHECK_S) as worker:
            assert worker.fenced and worker.busy == 0
            await asyncio.sleep(3 * CHECK_S)  # a few re-checks: still below, still not consuming
            assert worker.fenced and replies.results == [] and worker.stats.completed == 0
        channel = await connection.channel()
        queue = await topology.group_queue_spec(GROUP).declare(channel)
        assert queue.declaration_result.message_count == 1
        await channel.close()
        assert worker.stats.requeued == 0


async def test_failures_signed_by_another_key_in_a_nodes_name_do_not_fence_it(
    connection, topology, tiny_engine, tiny_tokenizer  # noqa: F811
) -> None:
    """A node knows its own key: an impostor's failures published first under its id (signed, but not by it)
    neither fence it nor make its own answers count as another key's (brokers check the DHT owner instead)."""
    await sink(connection, topology, "node-a", failures=FAILURES, signer=ResultSigner(RSAPrivateKey()))
    async with running_worker(connection, topology, tiny_engine, tiny_tokenizer, node_id="node-a",
                              reputation=ReputationConfig(half_life_s=60.0), fence_check_s=CHECK_S) as worker:
        assert not worker.fenced
    await sink(connection, topology, "node-a", failures=FAILURES)  # its own failures still fence it
    async with running_worker(connection, topology, tiny_engine, tiny_tokenizer, node_id="node-a",
                              reputation=ReputationConfig(half_life_s=60.0), fence_check_s=CHECK_S) as worker:
        assert worker.fenced
