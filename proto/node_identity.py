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

Every node started by this version has such an id (:mod:`node.node_id`, :meth:`node.blocks.dht.SwarmDHT.start`).
An id *of that form* (the base58 of a sha2-256 multihash, ``Qm...``: :func:`names_a_key`) can only be the
hash of some key, so a signer it does not derive from is an impostor, with no DHT needed either
(:func:`certification`). Ids of other forms (a random Ed25519 p2p identity, ``12D3Koo...``; a ``host-xxxxxx``
id from a state directory made before; an operator's ``--node-id``) certify nothing either way: they are
judged by the DHT owner checks, where an id that some *other* claimant's key derives to still marks the
signer as an impostor (:func:`self_certified_owner`).

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


def _unbase58(text: str) -> bytes | None:
    """The bytes ``text`` (base58btc) encodes; None when it is not base58btc."""
    number = 0
    for char in text:
        digit = _B58_ALPHABET.find(char)
        if digit < 0:
            return None
        number = number * 58 + digit
    zeros = len(text) - len(text.lstrip("1"))
    body = number.to_bytes((number.bit_length() + 7) // 8, "big") if number else b""
    return b"\x00" * zeros + body


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


def names_a_key(node_id: str) -> bool:
    """Whether ``node_id`` has the form of a key-derived peer id: base58btc of a sha2-256 multihash (``Qm...``).

    Such an id is the hash of exactly one public key (a sha2-256 collision aside), whoever chose it.
    """
    if len(node_id) != 46:  # base58 of 34 bytes starting 0x12: always 46 characters
        return False
    raw = _unbase58(node_id)
    return raw is not None and len(raw) == 34 and raw.startswith(_SHA2_256)


def certification(node_id: str, public_key: bytes) -> bool | None:
    """What the id alone says about ``public_key`` standing for it: True, it derives from the key; False, it
    is a key-derived id (:func:`names_a_key`) of *another* key; None, an id of another form that says nothing,
    or no key at all (an unsigned answer is judged elsewhere, never as an impostor's).
    """
    if not public_key:
        return None
    if self_certifies(node_id, public_key):
        return True
    return False if names_a_key(node_id) else None


def self_certified_owner(node_id: str, keys: Iterable[bytes]) -> bytes | None:
    """Among keys claiming ``node_id`` (e.g. its DHT record owners), the one it derives from; None if none.

    At most one key can derive to a given id (a sha2-256 collision aside), so this settles any number of
    claimants: every other claimant is an impostor.
    """
    for key in keys:
        if self_certifies(node_id, key):
            return key
    return None
