"""Live consumer groups from real hivemind DHT peers: valid records route, bad ones are skipped."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import hivemind
import pytest
from hivemind.utils import get_dht_time

from broker.config import BrokerConfig
from broker.service import BrokerService
from proto.dht_schema import make_record_validators, owner_subkey
from proto.records import NODES_KEY, HardwareInfo, NodeRecord
from proto.topology import Topology
from tests.helpers_broker import AgentEmu, StubGroup, error_name


@pytest.fixture
def dht() -> Iterator[hivemind.DHT]:
    peer = hivemind.DHT(start=True, record_validators=make_record_validators())
    yield peer
    peer.shutdown()


def announce(dht: hivemind.DHT, record: dict | NodeRecord, subkey: str, ttl: float = 30.0) -> None:
    value = record.to_dict() if isinstance(record, NodeRecord) else record
    signed = owner_subkey(make_record_validators(), subkey)  # what a real node does
    assert dht.store(NODES_KEY, value, expiration_time=get_dht_time() + ttl, subkey=signed)


async def test_groups_come_from_dht_node_records(amqp_url: str, topology: Topology, dht: hivemind.DHT) -> None:
    good = NodeRecord(peer_id="peer-a", address="127.0.0.1:1", group="gpu-bf16", models=("tiny",),
                      start_block=0, end_block=2, hardware=HardwareInfo(accelerator="cuda:test", gflops=1e4))
    announce(dht, good, "peer-a")
    announce(dht, {"peer_id": "peer-b", "group": "evil", "models": "tiny"}, "peer-b")  # invalid: skipped
    short = NodeRecord(peer_id="peer-c", address="127.0.0.1:2", group="cpu-int8", models=("other",),
                       start_block=0, end_block=2)
    announce(dht, short, "peer-c", ttl=2.0)
    maddrs = tuple(str(a) for a in dht.get_visible_maddrs())
    config = BrokerConfig(amqp_url=amqp_url, namespace=topology.namespace, initial_peers=maddrs,
                          directory_ttl_s=0.5)
    async with BrokerService(config) as service, AgentEmu(amqp_url, topology) as agent, \
            StubGroup(amqp_url, topology, "gpu-bf16") as stub:
        assert {g.group for g in service.directory.all_groups()} == {"gpu-bf16", "cpu-int8"}
        ok = await agent.submit(agent.request(model="tiny"))
        other = await agent.submit(agent.request(model="other"))
        unknown = await agent.submit(agent.request(model="missing"))
        async with StubGroup(amqp_url, topology, "cpu-int8"):
            results = await agent.wait_for([ok, other, unknown])
        assert results[ok].ok and stub.tasks[0].decision.group == "gpu-bf16"
        assert dict(stub.tasks[0].decision.reputations) == {"peer-a": 1.0}
        assert results[other].ok
        assert error_name(results[unknown]) == "UNKNOWN_MODEL"

        deadline = time.monotonic() + 15  # peer-c's record expires: its group leaves the directory
        while "cpu-int8" in {g.group for g in service.directory.all_groups()} and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        late = await agent.submit(agent.request(model="other"))
        result = (await agent.wait_for([late]))[late]
        assert error_name(result) == "UNKNOWN_MODEL" and "other" in result.error.message
