"""The broker against the real RabbitMQ: routing, typed errors + dead letters, deadlines, poison, priorities."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace

import pytest

from broker.config import BrokerConfig
from broker.service import BrokerService
from proto import messages_pb2
from proto.topology import DELIVERY_LIMIT, Topology
from scheduler.interface import FixedRulePolicy, GroupCandidate, RequestFeatures, Selection
from tests.helpers_broker import AgentEmu, StubGroup, drain_queue, error_name


def config_for(url: str, topology: Topology, **overrides: object) -> BrokerConfig:
    base = BrokerConfig(amqp_url=url, namespace=topology.namespace, static_groups={"g1": ("tiny",)},
                        broker_id="test-broker")
    return replace(base, **overrides)  # type: ignore[arg-type]


@pytest.fixture
async def broker(amqp_url: str, topology: Topology) -> AsyncIterator[BrokerService]:
    service = BrokerService(config_for(amqp_url, topology))
    await service.start()
    yield service
    await service.stop()


@pytest.fixture
async def agent(amqp_url: str, topology: Topology) -> AsyncIterator[AgentEmu]:
    async with AgentEmu(amqp_url, topology) as emu:
        yield emu


async def test_valid_request_is_routed_with_decision(amqp_url, topology, broker, agent) -> None:
    async with StubGroup(amqp_url, topology, "g1") as stub:
        rid = await agent.submit(agent.request(prompt="hi there"))
        result = (await agent.wait_for([rid]))[rid]
    assert result.ok and result.text == "echo:hi there"
    decision = stub.tasks[0].decision
    assert decision.group == "g1" and decision.scheduler == "fixed-rule" and decision.broker_id == "test-broker"
    assert decision.method == "baseline" and decision.sched_ms > 0
    assert broker.stats.routed["normal"] == 1
    # the selection's own time is recorded apart, and is part of the whole scheduling window
    assert list(broker.stats.select_ms) == [decision.sched_ms]
    assert 0 < broker.stats.select_ms[0] <= broker.stats.sched_ms[0]
    snapshot = broker.stats.snapshot()
    assert snapshot["select_p99_ms"] == round(decision.sched_ms, 4) <= snapshot["sched_p99_ms"]


def _bad_requests(agent: AgentEmu) -> list[tuple[str, messages_pb2.InferenceRequest]]:
    r = agent.request
    return [
        ("PROMPT_EMPTY", r(prompt="   ")),
        ("PROMPT_TOO_LONG", r(prompt="x" * 40_000)),
        ("UNKNOWN_MODEL", r(model="no-such-model")),
        ("MAX_NEW_TOKENS_OUT_OF_RANGE", r(max_new_tokens=0)),
        ("MAX_NEW_TOKENS_OUT_OF_RANGE", r(max_new_tokens=100_000)),
        ("BUDGET_INVALID", r(budget=-1.0)),
        ("BUDGET_INVALID", r(budget=math.inf)),
        ("INVALID_REQUEST", r(priority="urgent")),
        ("INVALID_REQUEST", r(sampling=messages_pb2.SamplingParams(temperature=math.nan))),
        ("INVALID_REQUEST", r(method_hint="warp-drive")),
        ("DEADLINE_EXCEEDED", r(deadline_unix=time.time() - 5)),
    ]


async def test_each_bad_input_gets_its_typed_error_and_is_dead_lettered(amqp_url, topology, broker, agent) -> None:
    async with StubGroup(amqp_url, topology, "g1") as stub:
        expected: dict[str, str] = {}
        valid_after: list[str] = []
        for code, bad in _bad_requests(agent):
            expected[await agent.submit(bad)] = code
            valid_after.append(await agent.submit(agent.request(prompt=f"valid after {code}")))
        # malformed protobuf: the sender is known from the AMQP properties only
        await agent.submit_raw(b"\xff\x00 not a protobuf", message_id="garbage-1", reply_to=agent.reply_to)
        expected["garbage-1"] = "MALFORMED_MESSAGE"
        valid_after.append(await agent.submit(agent.request(prompt="valid after garbage")))
        results = await agent.wait_for([*expected, *valid_after])
    for rid, code in expected.items():
        assert not results[rid].ok and error_name(results[rid]) == code, (code, results[rid])
        assert results[rid].error.message
    assert all(results[rid].ok for rid in valid_after)
    assert len(stub.tasks) == len(valid_after)
    dead = await drain_queue(amqp_url, topology.dead_letter_queue)
    dead_ids = {m.message_id for m in dead}
    assert set(expected) <= dead_ids, set(expected) - dead_ids
    assert not dead_ids & set(valid_after)


async def test_bad_reply_to_is_dead_lettered_without_reply(amqp_url, topology, broker, agent) -> None:
    bad = agent.request(reply_to=topology.group_queue("g1"))  # must not let anyone inject into a group queue
    await agent.submit(bad)
    async with StubGroup(amqp_url, topology, "g1") as stub:
        rid = await agent.submit(agent.request())
        await agent.wait_for([rid])
        await asyncio.sleep(0.3)
    assert [t.request.request_id for t in stub.tasks] == [rid]
    dead = await drain_queue(amqp_url, topology.dead_letter_queue)
    assert [m.message_id for m in dead] == [bad.request_id]


class PoisonPolicy(FixedRulePolicy):
    """Crashes on prompts containing 'poison' (an unexpected bug, not a typed refusal)."""

    def __init__(self) -> None:
        self.attempts = 0

    def select(self, request: RequestFeatures, candidates: Sequence[GroupCandidate]) -> Selection:
        if "poison" in request.task_text:
            self.attempts += 1
            raise RuntimeError("scheduler bug triggered by this request")
        return super().select(request, candidates)


class BatchingPoisonPolicy(PoisonPolicy):
    """The same bug behind a policy the broker routes in batches (one select_many per event-loop turn)."""

    batches = True


@pytest.mark.parametrize("policy_class", [PoisonPolicy, BatchingPoisonPolicy])
async def test_poison_message_hits_delivery_limit_and_the_rest_is_served(
    amqp_url, topology, agent, policy_class
) -> None:
    policy = policy_class()
    config = config_for(amqp_url, topology, batch_routing=policy.batches)
    async with BrokerService(config, policy=policy) as service, \
            StubGroup(amqp_url, topology, "g1") as stub:
        poison = await agent.submit(agent.request(prompt="poison pill"))
        behind = [await agent.submit(agent.request(prompt=f"after {i}")) for i in range(20)]
        results = await agent.wait_for([poison, *behind], timeout=60)
    assert error_name(results[poison]) == "DELIVERY_LIMIT"
    assert policy.attempts == DELIVERY_LIMIT + 1
    assert service.stats.crashed == DELIVERY_LIMIT + 1
    assert all(results[r].ok for r in behind) and len(stub.tasks) == len(behind)
    dead = await drain_queue(amqp_url, topology.dead_letter_queue)
    assert [m.message_id for m in dead] == [poison]


async def test_hard_crash_poison_is_answered_by_the_dead_letter_watcher(amqp_url, topology, broker, agent) -> None:
    """A task that kills its consumer every time is dead-lettered by RabbitMQ; the broker tells the sender."""
    async with StubGroup(amqp_url, topology, "g1"):
        pass  # declares the group queue
    rid = await agent.submit(agent.request(prompt="kills nodes"))
    import aio_pika

    for _ in range(DELIVERY_LIMIT + 1):  # a "node" that dies (closes its channel) on every delivery
        connection = await aio_pika.connect(amqp_url)
        channel = await connection.channel()
        queue = await channel.declare_queue(topology.group_queue("g1"), passive=True)
        for _ in range(100):
            if await queue.get(fail=False, no_ack=False) is not None:
                break
            await asyncio.sleep(0.05)
        await connection.close()
    result = (await agent.wait_for([rid], timeout=20))[rid]
    assert error_name(result) == "DELIVERY_LIMIT"


async def test_deadline_expiring_in_the_group_queue_is_reported(amqp_url, topology, broker, agent) -> None:
    async with StubGroup(amqp_url, topology, "g1"):
        pass  # the group queue exists, nobody consumes it
    rid = await agent.submit(agent.request(deadline_unix=time.time() + 1.0))
    result = (await agent.wait_for([rid], timeout=20))[rid]
    assert error_name(result) == "DEADLINE_EXCEEDED"


async def test_high_priority_wins_under_load_and_batch_is_not_starved(amqp_url, topology, agent) -> None:
    cfg = config_for(amqp_url, topology, max_in_flight=4,
                     prefetch={"high": 16, "normal": 16, "batch": 16})
    per_class = 150
    for priority in ("batch", "normal", "high"):  # queue everything up before the broker starts
        for i in range(per_class):
            await agent.submit(agent.request(prompt=f"{priority} {i}", priority=priority))
    async with StubGroup(amqp_url, topology, "g1", prefetch=500) as stub, BrokerService(cfg):
        deadline = time.monotonic() + 60
        while len(stub.tasks) < 3 * per_class and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    order = [t.request.priority for t in stub.tasks]
    assert len(order) == 3 * per_class
    first = order[:per_class]
    assert first.count("high") > first.count("normal") > first.count("batch") > 0, first
    last_high = max(i for i, p in enumerate(order) if p == "high")
    assert order[:last_high].count("batch") >= 1  # batch got slots while high was still busy
