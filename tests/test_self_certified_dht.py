"""With a real hivemind DHT: a peer started with its signing key as p2p identity has a self-certifying id.

Feasibility and behaviour of proto/node_identity.py against the real p2p daemon: a DHT peer whose identity
file holds the RSA key that signs its records (hivemind's ``identity_path``) is known by exactly the peer id
:func:`proto.node_identity.peer_id_of` derives from that key. An impostor peer then writes its own record
under that id (its own owner subkey: two claimants) and both write under an id that derives from neither.
A broker's directory reading the live DHT (:class:`broker.directory.DhtNodeReader`) keeps the key the id
derives from as the owner of the first, and calls the second ambiguous (nobody credited), instead of
keeping whichever claimant the DHT listed last.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import hivemind
import pytest
from hivemind.proto import crypto_pb2
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from broker.directory import DhtNodeReader, GroupDirectory
from broker.evidence import AMBIGUOUS_OWNER
from proto.dht_schema import make_record_validators, owner_subkey
from proto.node_identity import peer_id_of
from proto.records import NODES_KEY, NodeRecord
from proto.result_signing import ResultSigner


def write_identity(key: RSAPrivateKey, path: Path) -> Path:
    """The identity file hivemind's ``P2P.generate_identity`` would write, for a key we choose."""
    path.write_bytes(crypto_pb2.PrivateKey(key_type=crypto_pb2.KeyType.RSA, data=key.to_bytes()).SerializeToString())
    return path


def announce(dht: hivemind.DHT, key: RSAPrivateKey, node_id: str, group: str) -> None:
    """Store a node record under ``node_id``, owned (and signed) by ``key``, as a real node's announcer does."""
    record = NodeRecord(peer_id=node_id, address="", group=group, models=("tiny",), start_block=0, end_block=2)
    subkey = owner_subkey(make_record_validators(key), node_id)
    assert dht.store(NODES_KEY, record.to_dict(), expiration_time=get_dht_time() + 60, subkey=subkey)


@pytest.fixture
def keys() -> tuple[RSAPrivateKey, RSAPrivateKey]:
    return RSAPrivateKey(), RSAPrivateKey()


@pytest.fixture
def peers(keys: tuple[RSAPrivateKey, RSAPrivateKey], tmp_path: Path) -> Iterator[tuple[hivemind.DHT, hivemind.DHT]]:
    victim_key, impostor_key = keys
    victim = hivemind.DHT(start=True, identity_path=str(write_identity(victim_key, tmp_path / "identity")),
                          record_validators=make_record_validators(victim_key))
    impostor = None
    try:
        impostor = hivemind.DHT(start=True, initial_peers=[str(a) for a in victim.get_visible_maddrs()],
                                record_validators=make_record_validators(impostor_key))
        yield victim, impostor
    finally:
        if impostor is not None:
            impostor.shutdown()
        victim.shutdown()


async def test_a_peer_whose_identity_is_its_signing_key_owns_its_id_against_any_claimant(
    keys: tuple[RSAPrivateKey, RSAPrivateKey], peers: tuple[hivemind.DHT, hivemind.DHT]
) -> None:
    victim_key, impostor_key = keys
    victim, impostor = peers
    victim_id = peer_id_of(ResultSigner(victim_key).public_key)
    assert victim_id is not None and str(victim.peer_id) == victim_id  # the daemon announces the derived id
    assert str(impostor.peer_id) != peer_id_of(ResultSigner(impostor_key).public_key)  # a random identity

    announce(victim, victim_key, victim_id, "victim")
    announce(impostor, impostor_key, victim_id, "imp")  # its own record, under the victim's id
    announce(victim, victim_key, "legacy-id", "victim")
    announce(impostor, impostor_key, "legacy-id", "imp")

    reader = DhtNodeReader([str(a) for a in victim.get_visible_maddrs()])
    try:
        owned = await reader.fetch_owned()
        claimants = {(record.peer_id, key) for record, key in owned}
        assert len(claimants) == 4  # the DHT holds both claims on both ids
        directory = GroupDirectory(reader=reader)
        await directory.refresh()
        assert directory.owner_key(victim_id) == ResultSigner(victim_key).public_key
        assert directory.owner_key("legacy-id") == AMBIGUOUS_OWNER
        assert directory.ambiguous_nodes() == ["legacy-id"]
    finally:
        reader.shutdown()
