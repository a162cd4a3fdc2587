"""Results signed by the node that computed them, with the key that signs its DHT records.

Why. An ``InferenceResult`` names its node (``node_id``) and the agent's ``OutcomeReport``
moves that node's reputation. Unsigned, a node could put another node's id on its answers
and sink (or lift) that node. So a node signs every final result with the RSA key that
owns its DHT records (:mod:`proto.dht_schema`: the ``[owner:<key>]`` subkey). The agent
checks the signature (a tampered or re-labelled result is refused); the broker checks that
the key owns the named node's DHT record before the outcome moves that node's score.

What is signed: fixed fields in a fixed order, each length-prefixed, under a domain tag,
so a result signature can pass for nothing else (a DHT record, another field order)::

    answer_digest = SHA-256("dinet.answer.v1" | token_ids | text | finish_reason)
    signed bytes  = "dinet.result.v1" | request_id | node_id | group | ok | error_code | answer_digest

``error_code`` is 0 for an ok result. The two-level form lets an agent forward a 32-byte
``answer_digest`` in its outcome instead of the whole answer: a broker rebuilds the signed
bytes from the outcome's own request id, node, group, ok and error code plus that digest,
so an agent cannot report an outcome the node did not sign. One signature per request
(not per chunk): RSA-2048 measured 0.3 ms to sign and 0.04 ms to verify on this 2-core machine.

Keys and signatures are hivemind's own formats (``RSAPrivateKey``: PSS/SHA-256, base64
signature; public key in OpenSSH form), the very bytes a DHT owner subkey carries. Checking
needs only ``cryptography``: agents and brokers do not import hivemind (and torch) for it.
"""

from __future__ import annotations

import base64
import binascii
import enum
import functools
import hashlib
import os
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from proto import errors, messages_pb2

if TYPE_CHECKING:
    from hivemind.utils.crypto import RSAPrivateKey

RESULT_TAG = b"dinet.result.v1"
ANSWER_TAG = b"dinet.answer.v1"
DIGEST_BYTES = 32
MAX_KEY_BYTES = 2048  # an OpenSSH RSA-4096 public key is ~730 bytes
MAX_SIGNATURE_BYTES = 1024  # base64 of an RSA-4096 signature is 684 bytes
_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH)  # as hivemind signs


class ResultSignatureError(errors.NodeFailureError):
    """A result whose signature does not verify: tampered on the way, or forged in a node's name.

    Recoverable: the request can be sent again and reach an honest node.
    """


class Verdict(enum.Enum):
    UNSIGNED = "unsigned"  # no signer key and no signature (a node from before signing)
    VALID = "valid"
    INVALID = "invalid"  # a signature (or key) that does not verify, or only half of the pair


def _field(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def answer_digest(token_ids: Iterable[int], text: str, finish_reason: str) -> bytes:
    """SHA-256 of the answer's content (see the module docstring)."""
    ids = list(token_ids)
    packed = struct.pack(f">I{len(ids)}I", len(ids), *ids)
    return hashlib.sha256(
        ANSWER_TAG + packed + _field(text.encode("utf-8")) + _field(finish_reason.encode("utf-8"))
    ).digest()


def signed_bytes(*, request_id: str, node_id: str, group: str, ok: bool, error_code: int, digest: bytes) -> bytes:
    """The bytes a node signs for a result (``error_code`` is ignored when ``ok``: always 0 then)."""
    code = 0 if ok else int(error_code)
    return (
        RESULT_TAG
        + _field(request_id.encode("utf-8"))
        + _field(node_id.encode("utf-8"))
        + _field(group.encode("utf-8"))
        + struct.pack(">?I", ok, code)
        + _field(digest)
    )


def result_digest(result: messages_pb2.InferenceResult) -> bytes:
    return answer_digest(result.token_ids, result.text, result.finish_reason)


def result_signed_bytes(result: messages_pb2.InferenceResult) -> bytes:
    return signed_bytes(request_id=result.request_id, node_id=result.node_id, group=result.group, ok=result.ok,
                        error_code=result.error.code, digest=result_digest(result))


class ResultSigner:
    """Signs a node's final results with its DHT record key (pass the same ``RSAPrivateKey``)."""

    def __init__(self, private_key: RSAPrivateKey) -> None:
        self._key = private_key
        self.public_key: bytes = private_key.get_public_key().to_bytes()  # OpenSSH form, as in the owner subkey

    @property
    def private_key(self) -> RSAPrivateKey:
        """The key itself, for the node's DHT identity (:meth:`node.blocks.dht.SwarmDHT.start`): one key
        signs the node's results and its DHT records, and its peer id is derived from it."""
        return self._key

    @classmethod
    def process_wide(cls) -> ResultSigner:
        """hivemind's process-wide key: the one :func:`proto.dht_schema.make_record_validators` signs records
        with when it gets no key, i.e. the key of every DHT a node process starts."""
        from hivemind.utils.crypto import RSAPrivateKey

        return cls(RSAPrivateKey.process_wide())

    @classmethod
    def load_or_create(cls, path: Path) -> ResultSigner:
        """A key kept in a file: the node's identity, so a restarted node keeps its id and its reputation.

        Created (mode 0600, DER) when missing, so a restarted node signs (and, in the DHT, is named) with
        the key it had.
        """
        from hivemind.utils.crypto import RSAPrivateKey

        if path.exists():
            return cls(_key_from_der(path.read_bytes()))
        key = RSAPrivateKey()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(key.to_bytes())
        return cls(key)

    def sign(self, result: messages_pb2.InferenceResult) -> messages_pb2.InferenceResult:
        """Set ``signer_key`` and ``signature`` on ``result`` (in place; returned for chaining).

        Call it last: any later change to a signed field makes the result fail verification.
        """
        result.signer_key = self.public_key
        result.signature = self._key.sign(result_signed_bytes(result))
        return result

    def sign_fields(self, *, request_id: str, node_id: str, group: str, ok: bool, error_code: int,
                    digest: bytes) -> bytes:
        """The signature :meth:`sign` would put on a result with these fields and this answer digest."""
        return self._key.sign(signed_bytes(request_id=request_id, node_id=node_id, group=group, ok=ok,
                                           error_code=error_code, digest=digest))


def _key_from_der(der: bytes) -> RSAPrivateKey:
    from hivemind.utils.crypto import RSAPrivateKey

    # hivemind's RSAPrivateKey has no loader; its unpickling path (__setstate__) takes DER bytes
    key = RSAPrivateKey.__new__(RSAPrivateKey)
    key.__setstate__({"_private_key": der})
    return key


@functools.lru_cache(maxsize=1024)
def _public_key(raw: bytes) -> rsa.RSAPublicKey | None:
    try:
        key = serialization.load_ssh_public_key(raw)
    except Exception:  # bytes from a stranger: not OpenSSH, an unsupported algorithm, ... not a key
        return None
    return key if isinstance(key, rsa.RSAPublicKey) else None


def public_rsa_key(raw: bytes) -> rsa.RSAPublicKey | None:
    """An RSA public key in OpenSSH form (a ``signer_key``, an owner subkey), parsed; None if it is not one."""
    return _public_key(raw)


def verify_signature(public_key: bytes, data: bytes, signature: bytes) -> bool:
    """Whether ``signature`` (base64, as hivemind's ``RSAPrivateKey.sign`` makes it) is ``public_key``'s
    over ``data``; never raises on garbage."""
    if not public_key or not signature or len(public_key) > MAX_KEY_BYTES or len(signature) > MAX_SIGNATURE_BYTES:
        return False
    key = _public_key(public_key)
    if key is None:
        return False
    try:
        key.verify(base64.b64decode(signature, validate=True), data, _PSS, hashes.SHA256())
    except (InvalidSignature, binascii.Error, ValueError):
        return False
    return True


def verify_result(result: messages_pb2.InferenceResult) -> Verdict:
    """Whether a result is signed, and by the key it carries (who owns that key is the broker's check)."""
    if not result.signer_key and not result.signature:
        return Verdict.UNSIGNED
    ok = verify_signature(result.signer_key, result_signed_bytes(result), result.signature)
    return Verdict.VALID if ok else Verdict.INVALID
