"""A node joins the real DHT with its own key as identity: its peer id self-certifies, ``swarm`` shows it, and
drivers ignore block records that another key writes under that id.

:meth:`node.blocks.dht.SwarmDHT.start` with ``identity=`` makes the node's key (the one in its state
directory, which signs its results) the p2p identity and the signer of its records. So its peer id is
the id :func:`proto.node_identity.peer_id_of` derives from the key, the same after a restart, the
broker's directory credits that key for it, and a second live peer with the same key is refused.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from broker.directory import DhtNodeReader, GroupDirectory
from node.announce import QueueNodeAnnouncement, QueueNodePresence
from node.blocks.dht import IdentityInUseError, SwarmDHT
from node.blocks.swarm import format_summary, identity_of, summarize
from proto.dht_schema import owner_subkey, parse_owned_block_records
from proto.node_identity import peer_id_of, self_certifies
from proto.records import NODES_KEY, BlockRecord, HardwareInfo, NodeRecord, block_key
from proto.result_signing import ResultSigner


@pytest.fixture
def bootstrap() -> Iterator[SwarmDHT]:
    peer = SwarmDHT.start()
    yield peer
    peer.shutdown()


def test_a_peer_started_with_a_key_is_known_by_the_peer_id_of_that_key_across_restarts(
    bootstrap: SwarmDHT,
) -> None:
    key = RSAPrivateKey()
    expected = peer_id_of(ResultSigner(key).public_key)
    first = SwarmDHT.start(initial_peers=bootstrap.maddrs, identity=key)
    try:
        assert first.peer_id == expected
    finally:
        first.shutdown()
    again = SwarmDHT.start(initial_peers=bootstrap.maddrs, identity=key)  # a restarted node keeps its id
    try:
        assert again.peer_id == expected
    finally:
        again.shutdown()
    anonymous = SwarmDHT.start(initial_peers=bootstrap.maddrs)
    try:
        assert anonymous.peer_id != expected  # without an identity: a random peer id, as before
    finally:
        anonymous.shutdown()


def test_a_second_live_peer_with_the_same_key_is_refused_without_retrying(bootstrap: SwarmDHT) -> None:
    key = RSAPrivateKey()
    live = SwarmDHT.start(initial_peers=bootstrap.maddrs, identity=key)
    try:
        began = time.monotonic()
        with pytest.raises(IdentityInUseError, match=live.peer_id):
            SwarmDHT.start(initial_peers=bootstrap.maddrs, identity=key)
        assert time.monotonic() - began < 10.0  # one refusal, not three tries of a health check
    finally:
        live.shutdown()


async def test_the_broker_credits_the_key_a_node_announced_with_and_its_id_self_certifies(
    bootstrap: SwarmDHT,
) -> None:
    key = RSAPrivateKey()
    signer = ResultSigner(key)
    announcement = QueueNodeAnnouncement(model_name="tiny", group="keyed", num_blocks=4,
                                         hardware=HardwareInfo(), methods=("baseline",),
                                         announce_period_s=0.5, record_ttl_s=5.0)
    presence = await QueueNodePresence.start(announcement, initial_peers=bootstrap.maddrs, identity=key)
    reader = DhtNodeReader(bootstrap.maddrs)
    try:
        assert self_certifies(presence.peer_id, signer.public_key)
        directory = GroupDirectory(reader=reader)
        for _ in range(50):
            await directory.refresh()
            if directory.owner_key(presence.peer_id) is not None:
                break
            await asyncio.sleep(0.1)
        assert directory.owner_key(presence.peer_id) == signer.public_key
    finally:
        reader.shutdown()
        await presence.close()


async def test_swarm_shows_which_records_of_an_id_its_own_key_wrote(bootstrap: SwarmDHT) -> None:
    key, impostor_key = RSAPrivateKey(), RSAPrivateKey()
    announcement = QueueNodeAnnouncement(model_name="tiny", group="keyed", num_blocks=4, hardware=HardwareInfo(),
                                         methods=("baseline",), announce_period_s=0.5, record_ttl_s=5.0)
    presence = await QueueNodePresence.start(announcement, initial_peers=bootstrap.maddrs, identity=key)
    impostor = SwarmDHT.start(initial_peers=bootstrap.maddrs, identity=impostor_key)
    try:
        # a record under the victim's id, signed by the impostor's own key (the only one it can sign with)
        forged = NodeRecord(peer_id=presence.peer_id, address="", group="imp", models=("tiny",),
                            start_block=0, end_block=4)
        subkey = owner_subkey(impostor.validators, presence.peer_id)
        assert impostor.dht.store(NODES_KEY, forged.to_dict(), expiration_time=get_dht_time() + 30, subkey=subkey)
        for _ in range(50):
            owned = await bootstrap.owned_node_records()
            if sum(record.peer_id == presence.peer_id for record, _ in owned) == 2:
                break
            await asyncio.sleep(0.1)
        summary = summarize([record for record, _ in owned], [writer for _, writer in owned])
        assert {n["group"]: n["identity"] for n in summary["nodes"]} == {
            "keyed": "self-certified", "imp": "impostor (the id derives from another key)",
        }
        assert "id self-certified" in format_summary(summary)
    finally:
        impostor.shutdown()
        await presence.close()


def test_identity_of_a_record_from_the_key_that_wrote_it() -> None:
    owner, other, third = (ResultSigner(RSAPrivateKey()).public_key for _ in range(3))
    node_id = peer_id_of(owner)
    assert node_id is not None
    assert identity_of(node_id, owner, {owner, other}) == "self-certified"
    assert identity_of(node_id, other, {owner, other}) == "impostor (the id derives from another key)"
    assert identity_of(node_id, other, {other}) == "impostor (the id derives from another key)"
    assert identity_of("host-a1b2c3", other, {other}) == "unverified"
    assert identity_of("host-a1b2c3", other, {other, third}) == "ambiguous (2 keys claim it)"
    record = NodeRecord(peer_id="p", address="", group="g", models=("m",), start_block=0, end_block=1)
    assert summarize([record])["nodes"][0]["identity"] == "unknown"  # no writers given


async def test_drivers_ignore_block_records_another_key_writes_under_a_nodes_id(bootstrap: SwarmDHT) -> None:
    server = SwarmDHT.start(initial_peers=bootstrap.maddrs, identity=RSAPrivateKey())
    impostor = SwarmDHT.start(initial_peers=bootstrap.maddrs, identity=RSAPrivateKey())
    try:
        genuine = NodeRecord(peer_id=server.peer_id, address="127.0.0.1:1111", group="g", models=("m",),
                             start_block=0, end_block=2)
        await server.announce("m", genuine, ttl_s=30)
        forged = BlockRecord(peer_id=server.peer_id, address="127.0.0.1:6666", group="g", start_block=0, end_block=2)
        subkey = owner_subkey(impostor.validators, server.peer_id)  # the server's id, the impostor's key
        for block in range(2):
            assert impostor.dht.store(block_key("m", block), forged.to_dict(),
                                      expiration_time=get_dht_time() + 30, subkey=subkey)
        entry = None
        for _ in range(50):  # the forgery is really there, beside the genuine record
            entry = bootstrap.dht.get(block_key("m", 0), latest=True)
            if len(parse_owned_block_records(entry)) == 2:
                break
            await asyncio.sleep(0.1)
        assert {r.address for r, _ in parse_owned_block_records(entry)} == {"127.0.0.1:1111", "127.0.0.1:6666"}
        records = await bootstrap.block_records("m", 2)
        assert [(r.peer_id, r.address) for r in records] == [(server.peer_id, "127.0.0.1:1111")]
    finally:
        impostor.shutdown()
        server.shutdown()
