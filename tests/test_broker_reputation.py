"""Reputation from the telemetry stream: a failing or stalling node loses its traffic, then wins it back.

The evidence is what the real agent client saw (its ``OutcomeReport`` s) joined with the
broker's ``RoutingRecord`` s. The misbehaving stub nodes *lie* in their own TimingReports
("ok, 1000 tokens/s"): they sink anyway, because a node's word about itself is never read.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from dataclasses import replace

from agent.client import Agent
from broker.config import BrokerConfig, ReputationConfig
from broker.service import BrokerService
from proto import errors, messages_pb2
from proto.common_pb2 import ErrorCode
from proto.topology import Topology
from scheduler.interface import FixedRulePolicy, GroupCandidate, RequestFeatures, Selection
from tests.helpers_broker import StubGroup


async def _one(agent: Agent, service: BrokerService, stubs: list[StubGroup], *, max_new_tokens: int = 8) -> str:
    """Send one request, wait for its result and for the agent's outcome to be judged; return the group."""
    before = service.ledger.observed
    generation = agent.generate(model="tiny", prompt="which node?", max_new_tokens=max_new_tokens, timeout=20)
    with contextlib.suppress(errors.DinetError):  # a failing node's typed error: what the agent reports
        await generation.result()
    rid = generation.request_id
    groups: list[str] = []
    deadline = time.monotonic() + 10
    while (service.ledger.observed == before or not groups) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
        groups = [s.group for s in stubs if any(t.request.request_id == rid for t in s.tasks)]
    assert service.ledger.observed > before, "the agent's outcome never reached the broker's ledger"
    assert len(groups) == 1, groups
    return groups[0]


async def test_failing_node_loses_traffic_and_recovers(amqp_url: str, topology: Topology) -> None:
    half_life = 3.0
    config = BrokerConfig(
        amqp_url=amqp_url, namespace=topology.namespace, static_groups={"ga": ("tiny",), "gz": ("tiny",)},
        reputation=replace(ReputationConfig(), half_life_s=half_life, threshold=0.5),
    )
    failing = {"on": True}

    def flaky(task: messages_pb2.RoutedTask) -> tuple[bool, int, float]:
        return (False, ErrorCode.NODE_FAILURE, 0.0) if failing["on"] else (True, 0, 0.0)

    async with Agent(amqp_url, namespace=topology.namespace) as agent, \
            StubGroup(amqp_url, topology, "ga", node_id="good-node", report=True) as good, \
            StubGroup(amqp_url, topology, "gz", node_id="bad-node", behaviour=flaky, report=True, lie=True) as bad, \
            BrokerService(config) as service:
        stubs = [good, bad]
        # the fixed rule prefers "gz" on a tie, so the bad node gets the work until its reputation sinks
        groups = [await _one(agent, service, stubs)]
        while groups[-3:] != ["ga", "ga", "ga"] and len(groups) < 12:
            groups.append(await _one(agent, service, stubs))
        assert groups[0] == "gz" and groups[-3:] == ["ga", "ga", "ga"], groups
        assert 3 <= groups.count("gz") <= 5, groups  # three failures sink it (prior worth two successes)
        assert service.ledger.score("bad-node", time.time()) < 0.5
        assert {r.node_id: r.last_error for r in service.ledger.table(time.time())}["bad-node"] == "NODE_FAILURE"
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
        assert agent.outcomes.failed == 0

        # every broker rebuilds the same table by replaying the stream
        async with BrokerService(replace(config, broker_id="late-joiner")) as late:
            now = time.time()
            assert late.ledger.table(now) == service.ledger.table(now)
            assert late.telemetry.received == service.telemetry.received


class Predicting(FixedRulePolicy):
    """The fixed rule, predicting 100 tokens/s for every choice (what a node is judged against)."""

    def select(self, request: RequestFeatures, candidates: Sequence[GroupCandidate]) -> Selection:
        return replace(super().select(request, candidates), predicted_tokens_per_s=100.0)


class Learner:
    """Stands in for the scheduler's online learner: any object with observe(report)."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def observe(self, report: messages_pb2.TimingReport) -> None:
        self.seen.append(report.request_id)


async def test_stalling_node_is_judged_against_the_prediction(amqp_url: str, topology: Topology) -> None:
    """A node far slower than predicted, as its agent clocks it, loses its traffic though it claims to be fast;
    the sinks (meta-training set) still see every node report."""
    config = BrokerConfig(amqp_url=amqp_url, namespace=topology.namespace,
                          static_groups={"ga": ("tiny",), "gz": ("tiny",)})
    learner = Learner()

    def stall(task: messages_pb2.RoutedTask) -> tuple[bool, int, float]:
        return True, 0, 0.5  # 8 tokens in 0.5 s: 16 tokens/s at best, against 100 predicted

    async with Agent(amqp_url, namespace=topology.namespace) as agent, \
            StubGroup(amqp_url, topology, "ga", node_id="fast-node", report=True, with_tokens=True) as fast, \
            StubGroup(amqp_url, topology, "gz", node_id="slow-node", behaviour=stall, report=True, lie=True,
                      with_tokens=True) as slow, \
            BrokerService(config, policy=Predicting(), sinks=[learner]) as service:
        stubs = [fast, slow]
        groups = [await _one(agent, service, stubs)]
        while groups[-2:] != ["ga", "ga"] and len(groups) < 10:
            groups.append(await _one(agent, service, stubs))
        assert groups[0] == "gz" and groups[-2:] == ["ga", "ga"], groups
        table = {r.node_id: r for r in service.ledger.table(time.time())}
        assert table["slow-node"].last_error == "STALL" and not table["slow-node"].eligible
        assert table["fast-node"].eligible and table["fast-node"].failures == 0
        deadline = time.monotonic() + 10
        while len(learner.seen) < len(groups) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        sent = {t.request.request_id for s in stubs for t in s.tasks}
        assert set(learner.seen) == sent  # every node's own report reached the meta-training set
