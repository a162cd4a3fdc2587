"""Self-certifying node ids (proto/node_identity.py): a peer id derived from a signing key, checked with real keys.

The reference is hivemind's own ``PeerID.from_identity`` over the identity file its DHT would be started with
(``identity_path``), so the derivation here is the one the p2p daemon announces.
"""

from __future__ import annotations

from hivemind.p2p.p2p_daemon_bindings.datastructures import PeerID
from hivemind.proto import crypto_pb2
from hivemind.utils.crypto import RSAPrivateKey

from proto.node_identity import certification, names_a_key, peer_id_of, self_certified_owner, self_certifies
from proto.result_signing import ResultSigner


def identity_file_bytes(key: RSAPrivateKey) -> bytes:
    """What hivemind's ``P2P.generate_identity`` writes for ``key``."""
    return crypto_pb2.PrivateKey(key_type=crypto_pb2.KeyType.RSA, data=key.to_bytes()).SerializeToString()


def test_peer_id_of_a_signer_key_is_the_peer_id_hivemind_gives_that_key_as_identity() -> None:
    for _ in range(3):
        key = RSAPrivateKey()
        signer_key = ResultSigner(key).public_key
        assert peer_id_of(signer_key) == PeerID.from_identity(identity_file_bytes(key)).to_base58()


def test_a_node_id_self_certifies_only_with_the_key_it_derives_from() -> None:
    victim, impostor = RSAPrivateKey(), RSAPrivateKey()
    victim_key, impostor_key = ResultSigner(victim).public_key, ResultSigner(impostor).public_key
    victim_id = PeerID.from_identity(identity_file_bytes(victim)).to_base58()
    assert self_certifies(victim_id, victim_key)
    assert not self_certifies(victim_id, impostor_key)  # the impostor cannot claim the victim's id at all
    assert not self_certifies("laptop-1a2b3c", victim_key)  # an id from node/node_id.py certifies nothing


def test_garbage_keys_and_empty_ids_never_certify() -> None:
    key = ResultSigner(RSAPrivateKey()).public_key
    node_id = peer_id_of(key)
    assert node_id is not None
    for garbage in (b"", b"ssh-rsa AAAA", b"\x00" * 64, b"x" * 5000):
        assert peer_id_of(garbage) is None
        assert not self_certifies(node_id, garbage)
    assert not self_certifies("", key)


def test_the_self_certified_owner_settles_any_number_of_claimants() -> None:
    victim, a, b = (ResultSigner(RSAPrivateKey()).public_key for _ in range(3))
    victim_id = peer_id_of(victim)
    assert victim_id is not None
    assert self_certified_owner(victim_id, [a, victim, b]) == victim
    assert self_certified_owner(victim_id, [a, b]) is None  # nobody derives: the DHT cannot tell either
    assert self_certified_owner(victim_id, []) is None


def test_an_id_of_the_key_derived_form_names_one_key_and_refuses_every_other() -> None:
    owner, other = (ResultSigner(RSAPrivateKey()).public_key for _ in range(2))
    node_id = peer_id_of(owner)
    assert node_id is not None and names_a_key(node_id)
    assert certification(node_id, owner) is True
    assert certification(node_id, other) is False  # no DHT, no first-come: the id itself says whose it is


def test_ids_of_other_forms_say_nothing_about_any_key() -> None:
    key = ResultSigner(RSAPrivateKey()).public_key
    ed25519_peer_id = "12D3KooWRe5bkLFqU2Jt5ZEyVoTL7xFyBRGFHjnrSkUotK3ozu7W"  # hivemind's default, random identity
    for node_id in (ed25519_peer_id, "laptop-1a2b3c", "", "Qm" + "0" * 44, "Qm" + "1" * 44, "QmPeer"):
        assert not names_a_key(node_id), node_id
        assert certification(node_id, key) is None
