"""MetaInf learns online inside a running broker: telemetry through RabbitMQ -> retrain -> new decisions.

The whole loop with the real pieces: TimingReports published to the telemetry stream, the broker's stream
consumer feeding them to the online learner, a background retrain, the swapped model's version recorded
in later routing decisions, and the picked method following what the data says.
"""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import aio_pika

from broker.config import BrokerConfig
from broker.directory import GroupDirectory
from broker.service import BrokerService
from proto.methods import METHODS
from proto.records import NodeRecord
from proto.topology import Topology
from scheduler.online import OnlineLearner
from scheduler.selection import SelectionConfig
from scheduler.synthetic import CANONICAL_HARDWARE
from tests.helpers_broker import AgentEmu, StubGroup
from tests.scheduler_helpers import FAST, report

GROUP, HW = CANONICAL_HARDWARE[0]
PROMPT = "def parse(text):\n    " * 20  # ~100 tokens by the broker's estimate, like the reports below
_ids = itertools.count()


async def publish_reports(url: str, topology: Topology, speeds: dict[str, float], per_method: int) -> None:
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        await topology.telemetry_spec().declare(channel)
        for i in range(per_method):
            for method, tps in speeds.items():
                body = report(
                    group=GROUP, hw=HW, method=method, tokens_per_s=tps * (1 + 0.02 * (i % 5)),
                    prompt_tokens=80 + 10 * (i % 5), concurrency=1 + i % 2, request_id=f"tr-{next(_ids)}",
                ).SerializeToString()
                await channel.default_exchange.publish(aio_pika.Message(body), routing_key=topology.telemetry_stream)
    finally:
        await connection.close()


async def route_one(agent: AgentEmu, stub: StubGroup) -> tuple[str, str, str]:
    """Submit one request, wait for it, and return the (scheduler, method, model version) that routed it."""
    before = len(stub.tasks)
    rid = await agent.submit(agent.request(model="tiny", prompt=PROMPT, max_new_tokens=256))
    await agent.wait_for([rid])
    decision = stub.tasks[before].decision
    return decision.scheduler, decision.method, decision.model_version


async def test_telemetry_through_rabbitmq_retrains_the_broker_and_changes_its_choice(
    amqp_url: str, topology: Topology, tmp_path: Path
) -> None:
    learner = OnlineLearner.create(
        tmp_path / "learner", retrain_every=150, retrain_interval_s=0, min_rows=100, max_rows=400, config=FAST,
        selection=SelectionConfig(epsilon=0.0), seed=0,
    )
    directory = GroupDirectory(ttl_s=60.0)
    directory.set_dht_records([NodeRecord(peer_id="n1", address="127.0.0.1:1", group=GROUP, models=("tiny",),
                                          start_block=0, end_block=4, hardware=HW)])
    config = BrokerConfig(amqp_url=amqp_url, namespace=topology.namespace)
    methods = [m for m in METHODS if m != "spec_draft"]
    async with BrokerService(config, policy=learner, directory=directory) as service, \
            AgentEmu(amqp_url, topology) as agent, StubGroup(amqp_url, topology, GROUP) as stub:
        # cold start: documented expert rules, no model version
        scheduler, _, version = await route_one(agent, stub)
        assert (scheduler, version) == ("expert-rules", "")

        # the stream says prompt-lookup decoding is 3x faster for this workload
        await publish_reports(amqp_url, topology, {m: 60.0 if m == "spec_ngram" else 20.0 for m in methods}, 25)
        assert await asyncio.to_thread(learner.wait_for_trains, 1, 120), learner.status()
        v1 = learner.model_version
        assert await route_one(agent, stub) == ("metainf", "spec_ngram", v1)

        # the data changes: now the baseline is fastest -> another retrain, a new version, a new choice
        await publish_reports(amqp_url, topology, {m: 80.0 if m == "baseline" else 25.0 for m in methods}, 50)
        assert await asyncio.to_thread(learner.wait_for_trains, 2, 120), learner.status()
        assert await asyncio.to_thread(learner.wait_idle, 120)
        v2 = learner.model_version
        assert v2 != v1
        assert await route_one(agent, stub) == ("metainf", "baseline", v2)
        assert service.telemetry.received >= 7 * 75
