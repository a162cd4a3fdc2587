"""The agent reports what it saw to the telemetry stream; a broker judges the node that answered on it.

Real RabbitMQ, the real broker service (in process), a real node worker on the tiny model.
"""

from __future__ import annotations

import asyncio
import time

import aio_pika
import pytest

from agent import Agent
from agent.outcomes import OutcomeReporter
from broker.config import BrokerConfig
from broker.evidence import Outcome, parse_outcome, parse_route_batch
from broker.service import BrokerService
from proto import errors
from proto.telemetry import OUTCOME_REPORT, ROUTING_RECORD_BATCH, TIMING_REPORT, entry_kind
from proto.topology import Topology
from tests.helpers_worker import GROUP, running_worker, tiny_engine, tiny_tokenizer  # noqa: F401 (fixtures)


async def stream_entries(amqp_url: str, topology: Topology, *, idle_s: float = 0.5) -> list[tuple[str, bytes]]:
    """Every entry of the test's telemetry stream, as (kind, body), read from its start."""
    connection = await aio_pika.connect(amqp_url)
    entries: list[tuple[str, bytes]] = []
    try:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=500)
        queue = await topology.telemetry_spec().declare(channel)

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            entries.append((entry_kind(message.type), message.body))
            await message.ack()

        await queue.consume(on_message, arguments={"x-stream-offset": "first"})
        seen = -1
        while seen != len(entries):
            seen = len(entries)
            await asyncio.sleep(idle_s)
    finally:
        await connection.close()
    return entries


async def outcomes_of(amqp_url: str, topology: Topology) -> list[Outcome]:
    return [parse_outcome(body) for kind, body in await stream_entries(amqp_url, topology) if kind == OUTCOME_REPORT]


async def test_an_answered_request_is_reported_and_judged(
    amqp_url: str, topology: Topology, tiny_engine, tiny_tokenizer  # noqa: F811
) -> None:
    config = BrokerConfig(amqp_url=amqp_url, namespace=topology.namespace, static_groups={GROUP: ("tiny",)})
    connection = await aio_pika.connect_robust(amqp_url)
    try:
        async with BrokerService(config) as broker, \
                running_worker(connection, topology, tiny_engine, tiny_tokenizer, node_id="node-a"), \
                Agent(amqp_url, namespace=topology.namespace) as agent:
            generation = agent.generate(model="tiny", prompt="hello", max_new_tokens=12)
            chunks = [c async for c in generation]
            result = await generation.result()
            deadline = time.monotonic() + 10
            while broker.ledger.observed == 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            (row,) = broker.ledger.table(time.time())
            assert (row.node_id, row.group, row.reports, row.failures) == ("node-a", GROUP, 1, 0.0) and row.eligible
    finally:
        await connection.close()
    entries = await stream_entries(amqp_url, topology)
    kinds = [kind for kind, _ in entries]
    # the broker's record is on the stream before the task exists; the node's report and the agent's outcome
    # both follow the result, in either order (the node's report is not evidence either way)
    # (as one RoutingRecordBatch: the records of a broker's loop turn travel together)
    assert kinds.index(ROUTING_RECORD_BATCH) < min(kinds.index(TIMING_REPORT), kinds.index(OUTCOME_REPORT))
    (batch_body,) = [body for kind, body in entries if kind == ROUTING_RECORD_BATCH]
    (record,) = parse_route_batch(batch_body)
    assert record.request_id == result.request_id and record.decision.group == GROUP
    (seen,) = [parse_outcome(body) for kind, body in entries if kind == OUTCOME_REPORT]
    assert seen.request_id == result.request_id and seen.node_id == result.node_id == "node-a"
    assert seen.ok and seen.answered and seen.group == GROUP and seen.agent_id == agent.config.agent_id
    assert seen.new_tokens == len(result.token_ids) == 12 and len(chunks) >= 1
    assert 0 < seen.ttft_s <= seen.total_s and seen.tokens_per_s > 0  # the agent's clock, not the node's


async def test_no_answer_by_the_deadline_is_reported_without_a_node(amqp_url: str, topology: Topology) -> None:
    """Nobody routes the request: the agent says so, and names no node (there is none to blame)."""
    async with Agent(amqp_url, namespace=topology.namespace) as agent:
        with pytest.raises(errors.DeadlineExceededError):
            await agent.complete(model="tiny", prompt="anyone?", deadline_s=0.3, timeout=0.5, request_id="late-1")
    (seen,) = await outcomes_of(amqp_url, topology)
    assert seen.request_id == "late-1" and not seen.answered and seen.deadline_passed and seen.node_id == ""


async def test_a_failed_outcome_publish_does_not_fail_the_result(
    amqp_url: str, topology: Topology, tiny_engine, tiny_tokenizer  # noqa: F811
) -> None:
    config = BrokerConfig(amqp_url=amqp_url, namespace=topology.namespace, static_groups={GROUP: ("tiny",)})
    connection = await aio_pika.connect_robust(amqp_url)
    try:
        async with BrokerService(config), running_worker(connection, topology, tiny_engine, tiny_tokenizer), \
                Agent(amqp_url, namespace=topology.namespace) as agent:
            nowhere = Topology(f"{topology.namespace}-nowhere")  # no telemetry stream there: the publish is refused
            agent.outcomes = OutcomeReporter(nowhere, agent.config.agent_id)
            result = await agent.complete(model="tiny", prompt="hello", max_new_tokens=4)
            await agent.outcomes.flush(5.0)
            assert len(result.token_ids) == 4
            assert (agent.outcomes.published, agent.outcomes.failed) == (0, 1)
            assert len((await agent.complete(model="tiny", prompt="again", max_new_tokens=4)).token_ids) == 4
    finally:
        await connection.close()
    assert await outcomes_of(amqp_url, topology) == []
