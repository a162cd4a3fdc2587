"""Self-certifying node ids: a node id that is the libp2p peer id of the very key that signs its results.

Why. A node id is bound to a key in the DHT only by *which record a key wrote* (the ``[owner:<key>]``
subkey, :mod:`proto.dht_schema`), and anyone can write a record under any node id with its own key:
then two keys claim one id and nobody can tell which is genuine. A libp2p peer id, though, is by
construction a hash of a public key (https://github.com/libp2p/specs/blob/master/peer-ids/peer-ids.md)::

    peer id = base58btc( multihash(sha2-256, protobuf PublicKey{key_type: RSA, data: DER SubjectPublicKeyInfo}) )

hivemind computes the same (``PeerID.from_identity``) for the RSA identity files its DHT can be started
with (``identity_path``). So when the key that signs a node's results is also its p2p identity, anyone
holding the result checks ``node_id == peer_id_of(signer_key)`` with no DHT lookup, and no other key can
ever pass for that id. :func:`self_certifies` is that check, shared by the agent (:mod:`agent.owners`)
and the broker (:mod:`broker.evidence`, :mod:`broker.directory`).

What it does not do: a False answer does not mean an impostor. Node ids made before this (a random p2p
identity, or :mod:`node.node_id` for nodes without a DHT) do not derive from their signing key; they stay
as unconfirmed as before and are judged by the DHT owner checks. Only an id that some *other* claimant's
key derives to marks the signer as an impostor (:func:`self_certified_owner`).

Pure Python plus ``cryptography``: agents and brokers do not import hivemind (or torch) for it.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable

from cryptography.hazmat.primitives import serialization

from proto.result_signing import MAX_KEY_BYTES, public_rsa_key

_B58_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"  # base58btc, as libp2p writes ids
_SHA2_256 = b"\x12\x20"  # multihash prefix: code 0x12 (sha2-256), digest length 32
_RSA_KEY_TYPE = b"\x08\x00"  # protobuf field 1 (key_type, varint) = RSA (0); proto2 `required`: always written


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _base58(data: bytes) -> str:
    number = int.from_bytes(data, "big")
    digits = ""
    while number:
        number, rest = divmod(number, 58)
        digits = _B58_ALPHABET[rest] + digits
    zeros = len(data) - len(data.lstrip(b"\x00"))  # each leading zero byte is one leading '1'
    return "1" * zeros + digits


@functools.lru_cache(maxsize=1024)
def peer_id_of(public_key: bytes) -> str | None:
    """The libp2p peer id (base58) of an RSA public key in OpenSSH form (a result's ``signer_key``, a DHT
    owner subkey); None for anything that is not such a key (never raises on a stranger's bytes)."""
    if not public_key or len(public_key) > MAX_KEY_BYTES:
        return None
    key = public_rsa_key(public_key)
    if key is None:
        return None
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    encoded = _RSA_KEY_TYPE + b"\x12" + _varint(len(der)) + der  # field 2 (data, bytes)
    return _base58(_SHA2_256 + hashlib.sha256(encoded).digest())


def self_certifies(node_id: str, public_key: bytes) -> bool:
    """Whether ``node_id`` is the peer id of ``public_key``: the key alone proves it may stand for the id."""
    return bool(node_id) and peer_id_of(public_key) == node_id


def self_certified_owner(node_id: str, keys: Iterable[bytes]) -> bytes | None:
    """Among keys claiming ``node_id`` (e.g. its DHT record owners), the one it derives from; None if none.

    At most one key can derive to a given id (a sha2-256 collision aside), so this settles any number of
    claimants: every other claimant is an impostor.
    """
    for key in keys:
        if self_certifies(node_id, key):
            return key
    return None
