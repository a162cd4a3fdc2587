"""Whole-model nodes (vLLM) announce their group in the real DHT without serving blocks.

Brokers see such a node's group, hardware and methods; chains never route through it (no block
records, no address); a clean stop withdraws the record. The vLLM engine itself needs a GPU, so the
announcement is driven here directly, with the same code the daemon runs after building the engine.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from broker.directory import DhtNodeReader, GroupDirectory
from node.announce import QueueNodeAnnouncement, QueueNodePresence
from node.blocks.dht import SwarmDHT
from node.blocks.swarm import format_summary, summarize
from node.daemon import NodeConfig
from proto.node_identity import self_certifies
from proto.records import HardwareInfo, NodeRecord


@pytest.fixture
def bootstrap() -> Iterator[SwarmDHT]:
    peer = SwarmDHT.start()
    yield peer
    peer.shutdown()


def announcement(**overrides: object) -> QueueNodeAnnouncement:
    fields: dict = dict(model_name="tiny", group="gpu-vllm", num_blocks=4,
                        hardware=HardwareInfo(accelerator="cuda:H100", gflops=5e4, weight_format="bf16"),
                        methods=("prefix_caching", "baseline"), announce_period_s=0.5, record_ttl_s=3.0)
    fields.update(overrides)
    return QueueNodeAnnouncement(**fields)


async def wait_for(predicate, fetch, timeout_s: float = 10.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while True:
        value = await fetch()
        if predicate(value) or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.2)


async def test_queue_only_node_is_a_live_group_for_brokers_but_no_block_server(bootstrap: SwarmDHT) -> None:
    presence = await QueueNodePresence.start(announcement(), initial_peers=bootstrap.maddrs)
    reader = DhtNodeReader(bootstrap.maddrs)
    try:
        records = await wait_for(lambda rs: len(rs) == 1, reader.fetch)
        assert [(r.peer_id, r.address, r.group, r.methods) for r in records] == [
            (presence.peer_id, "", "gpu-vllm", ("prefix_caching", "baseline"))
        ]
        assert not records[0].serves_blocks and records[0].hardware.accelerator == "cuda:H100"

        directory = GroupDirectory()  # what a broker's refresher does with every fetch
        directory.set_dht_records(records)
        assert [(g.group, g.methods) for g in directory.groups_for("tiny")] == [
            ("gpu-vllm", frozenset({"prefix_caching", "baseline"}))
        ]

        assert await bootstrap.block_records("tiny", 4) == []  # nothing for a chain to route through
        summary = summarize(records)
        assert summary["models"]["tiny"]["queue_only_nodes"] == 1
        assert summary["models"]["tiny"]["servers_per_block"] == [] and not summary["models"]["tiny"]["complete"]
        assert "(queue only)" in format_summary(summary) and "no block servers" in format_summary(summary)

        await presence.close()
        gone = await wait_for(lambda rs: not rs, reader.fetch)
        assert gone == []  # withdrawn at once (tombstone), not after the TTL
    finally:
        reader.shutdown()


def test_queue_only_records_mix_with_block_servers_in_the_swarm_summary() -> None:
    server = NodeRecord(peer_id="s", address="127.0.0.1:1", group="cpu", models=("m",), start_block=0,
                        end_block=2, num_blocks=2)
    whole = NodeRecord(peer_id="w", address="", group="gpu", models=("m",), start_block=0, end_block=2,
                       num_blocks=2)
    model = summarize([server, whole])["models"]["m"]
    assert model["servers_per_block"] == [1, 1] and model["complete"] and model["queue_only_nodes"] == 1


def test_announcement_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="num_blocks"):
        announcement(num_blocks=0)
    with pytest.raises(ValueError, match="shorter"):
        announcement(announce_period_s=5.0, record_ttl_s=3.0)


def test_vllm_with_initial_peers_announces_instead_of_serving_blocks() -> None:
    config = NodeConfig(model="m", model_name="m", group="gpu", engine="vllm", initial_peers=("/ip4/1.2.3.4/tcp/1",))
    assert not config.sharded and config.announces_queue_node
    local = NodeConfig(model="m", model_name="m", group="cpu", initial_peers=("/ip4/1.2.3.4/tcp/1",))
    assert local.sharded and not local.announces_queue_node  # the local engine serves its blocks instead
    with pytest.raises(ValueError, match="drop --blocks"):
        NodeConfig(model="m", model_name="m", group="gpu", engine="vllm", blocks=(0, 2))


async def test_a_vllm_node_with_initial_peers_is_seen_by_brokers_under_its_dht_identity_across_restarts(
    bootstrap: SwarmDHT, amqp_url: str, topology, tiny_model_path, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon's wiring: after the engine is built the node announces itself, and its telemetry identity is the
    DHT peer id that brokers list under the group (so reputations attach to the node the directory shows). That
    id derives from the key in the node's state directory, so it self-certifies, and a restarted node comes back
    under the same id.

    No GPU here, so the engine is the tiny model in a LocalEngine standing in for vLLM (a GPU engine built for
    continuous batching); RabbitMQ and the DHT are real.
    """
    from node.daemon import NodeDaemon, node_signer
    from node.engines import vllm_engine
    from node.local_engine import LocalEngine

    def fake_load(model: str, **_: object) -> LocalEngine:
        engine = LocalEngine.load(model)
        engine.methods = ("continuous_batching", "dynamic_batching")
        return engine

    monkeypatch.setattr(vllm_engine.VllmEngine, "load", staticmethod(fake_load))
    config = NodeConfig(model=str(tiny_model_path), model_name="tiny", group="gpu-vllm", engine="vllm",
                        amqp_url=amqp_url, namespace=topology.namespace, state_dir=tmp_path / "state",
                        initial_peers=tuple(bootstrap.maddrs))
    daemon = NodeDaemon(config)
    await daemon.start()
    reader = DhtNodeReader(bootstrap.maddrs)
    stopped = False
    try:
        records = await wait_for(lambda rs: len(rs) == 1, reader.fetch)
        assert daemon.worker is not None
        assert [(r.peer_id, r.group, r.methods, r.serves_blocks) for r in records] == [
            (daemon.worker.config.node_id, "gpu-vllm", ("continuous_batching", "dynamic_batching"), False)
        ]
        node_id = daemon.worker.config.node_id
        assert self_certifies(node_id, node_signer(tmp_path / "state").public_key)
        await daemon.stop()
        stopped = True
        assert await wait_for(lambda rs: not rs, reader.fetch) == []  # withdrawn on a clean stop

        daemon = NodeDaemon(config)  # the same state directory: the same key, so the same id
        await daemon.start()
        stopped = False
        assert daemon.worker is not None and daemon.worker.config.node_id == node_id
        records = await wait_for(lambda rs: len(rs) == 1, reader.fetch)
        assert [r.peer_id for r in records] == [node_id]
    finally:
        reader.shutdown()
        if not stopped:
            await daemon.stop()
