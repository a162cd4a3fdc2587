"""Reputation from the telemetry stream: a failing node loses its traffic, then wins it back by behaving."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

from broker.config import BrokerConfig, ReputationConfig
from broker.service import BrokerService
from proto import messages_pb2
from proto.common_pb2 import ErrorCode
from proto.topology import Topology
from tests.helpers_broker import AgentEmu, StubGroup, error_name, publish_report


async def _one(agent: AgentEmu, service: BrokerService, stubs: list[StubGroup]) -> str:
    """Send one request, wait for its result and for its TimingReport to reach the broker; return the group."""
    before = service.telemetry.received
    rid = await agent.submit(agent.request(prompt="which node?"))
    await agent.wait_for([rid], timeout=20)
    deadline = time.monotonic() + 10
    while service.telemetry.received == before and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    return next(s.group for s in stubs if any(t.request.request_id == rid for t in s.tasks))


async def test_failing_node_loses_traffic_and_recovers(amqp_url: str, topology: Topology) -> None:
    half_life = 3.0
    config = BrokerConfig(
        amqp_url=amqp_url, namespace=topology.namespace, static_groups={"ga": ("tiny",), "gz": ("tiny",)},
        reputation=replace(ReputationConfig(), half_life_s=half_life, threshold=0.5),
    )
    failing = {"on": True}

    def flaky(task: messages_pb2.RoutedTask) -> tuple[bool, int, float]:
        return (False, ErrorCode.NODE_FAILURE, 0.0) if failing["on"] else (True, 0, 0.0)

    async with AgentEmu(amqp_url, topology) as agent, \
            StubGroup(amqp_url, topology, "ga", node_id="good-node", report=True) as good, \
            StubGroup(amqp_url, topology, "gz", node_id="bad-node", behaviour=flaky, report=True) as bad, \
            BrokerService(config) as service:
        stubs = [good, bad]
        # the fixed rule prefers "gz" on a tie, so the bad node gets the work until its reputation sinks
        groups = [await _one(agent, service, stubs)]
        while groups[-3:] != ["ga", "ga", "ga"] and len(groups) < 12:
            groups.append(await _one(agent, service, stubs))
        assert groups[0] == "gz" and groups[-3:] == ["ga", "ga", "ga"], groups
        assert 3 <= groups.count("gz") <= 5, groups  # three failures sink it (prior worth two successes)
        assert service.ledger.score("bad-node", time.time()) < 0.5
        last = good.tasks[-1].decision
        assert dict(last.reputations) == {"good-node": service.ledger.score("good-node", last.routed_at)}

        failing["on"] = False  # the node behaves again; its bad record decays
        recovered_at = None
        for i in range(40):
            if await _one(agent, service, stubs) == "gz":
                recovered_at = i
                break
            await asyncio.sleep(half_life / 4)
        assert recovered_at is not None, "the node never got traffic again"
        for _ in range(3):
            assert await _one(agent, service, stubs) == "gz"
        assert service.ledger.score("bad-node", time.time()) >= 0.5

        # every broker rebuilds the same table by replaying the stream
        async with BrokerService(replace(config, broker_id="late-joiner")) as late:
            now = time.time()
            assert late.ledger.table(now) == service.ledger.table(now)
            assert late.telemetry.received == service.telemetry.received


class Learner:
    """Stands in for the scheduler's online learner: any object with observe(report)."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def observe(self, report: messages_pb2.TimingReport) -> None:
        self.seen.append(report.request_id)


async def test_stalling_node_is_judged_against_the_prediction(amqp_url: str, topology: Topology) -> None:
    """Stalls published to the stream sink a node (no self-reported score is read); sinks see every report."""
    config = BrokerConfig(amqp_url=amqp_url, namespace=topology.namespace, static_groups={"g1": ("tiny",)})
    learner = Learner()
    for i in range(4):
        report = messages_pb2.TimingReport(
            request_id=f"r{i}", node_id="slow-node", group="g1", model="tiny", ok=True, finished_at=time.time(),
            timing=messages_pb2.Timing(new_tokens=8, total_s=8.0, tokens_per_s=1.0),
            decision=messages_pb2.RoutingDecision(group="g1", predicted_tokens_per_s=50.0),
        )
        await publish_report(amqp_url, topology, report)
    async with BrokerService(config, sinks=[learner]) as service, AgentEmu(amqp_url, topology) as agent:
        assert service.ledger.score("slow-node", time.time()) < 0.5
        assert learner.seen == ["r0", "r1", "r2", "r3"]
        rid = await agent.submit(agent.request())
        result = (await agent.wait_for([rid]))[rid]
    assert not result.ok and error_name(result) == "NO_ROUTE"
