"""How dinet records are signed, stored and read back in the hivemind DHT.

Shared by nodes (which announce) and brokers/drivers (which read), so both agree on
the conventions without brokers importing ``node``:

- Every record lives under a key from :mod:`proto.records` and a *subkey* that names
  its owner: ``b"<peer id>" + b"[owner:<RSA public key>]"``. hivemind's
  :class:`~hivemind.dht.crypto.RSASignatureValidator` then requires every value stored
  under that subkey to carry the owner's signature, so nobody but the owner can
  overwrite or forge a node's records.
- A DHT built with :func:`make_record_validators` checks those signatures on every
  store it accepts and every value it fetches. Readers additionally drop unsigned
  subkeys (anyone could write them) and records whose ``peer_id`` differs from the
  subkey's, then validate the fields with the record's ``from_dict``.
- The same key signs the node's results (:mod:`proto.result_signing`);
  :func:`parse_owned_node_records` says which key owns each node's record, so a broker
  can check that a result signed as node X was signed by X's owner.
- A node that shuts down cleanly overwrites its records with :data:`TOMBSTONE`
  (newer expiration wins in hivemind), so it leaves routing at once instead of after
  one expiry.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.validation import RecordValidatorBase
from hivemind.utils.crypto import RSAPrivateKey

from proto.records import BlockRecord, NodeRecord, RecordError

logger = logging.getLogger(__name__)

TOMBSTONE: dict[str, Any] = {"offline": True}
_OWNER_MARK = b"[owner:"
_OWNER_KEY_RE = re.compile(RSASignatureValidator.PUBLIC_KEY_REGEX)

R = TypeVar("R", BlockRecord, NodeRecord)


def make_record_validators(private_key: RSAPrivateKey | None = None) -> list[RecordValidatorBase]:
    """Validators to pass as ``hivemind.DHT(record_validators=...)`` on every dinet peer.

    :param private_key: the key this peer signs its own records with; ``None`` uses
        hivemind's process-wide key (one identity per process).
    """
    return [RSASignatureValidator(private_key)]


def owner_subkey(validators: Iterable[RecordValidatorBase], peer_id: str) -> bytes:
    """The subkey under which ``peer_id`` stores its records, bound to its signing key."""
    for validator in validators:
        if isinstance(validator, RSASignatureValidator):
            return peer_id.encode() + validator.local_public_key
    raise ValueError("no RSASignatureValidator among the validators; build them with make_record_validators()")


def subkey_peer_id(subkey: Any) -> str | None:
    """The peer id of a signed subkey, or ``None`` when the subkey is not owner-protected."""
    if not isinstance(subkey, bytes) or _OWNER_MARK not in subkey:
        return None
    head = subkey.split(_OWNER_MARK, 1)[0]
    try:
        return head.decode()
    except UnicodeDecodeError:
        return None


def subkey_owner_key(subkey: Any) -> bytes | None:
    """The owner's public key (OpenSSH form, what :class:`proto.result_signing.ResultSigner` signs with) in a
    signed subkey, or ``None``."""
    if not isinstance(subkey, bytes):
        return None
    match = _OWNER_KEY_RE.search(subkey)
    return match.group(1) if match else None


def is_tombstone(value: Any) -> bool:
    return isinstance(value, dict) and value.get("offline") is True


def parse_entry(entry: Any, parse: Callable[[Any], R], *, now: float | None = None) -> list[R]:
    """Valid records from the result of ``dht.get(key, latest=True)``.

    Skips (with a debug log, never an exception) tombstones, unsigned subkeys, records
    whose ``peer_id`` is not the subkey's, expired entries and fields that fail
    validation.

    :param entry: ``ValueWithExpiration`` whose value is ``{subkey: ValueWithExpiration}``, or ``None``.
    :param parse: ``BlockRecord.from_dict`` or ``NodeRecord.from_dict``.
    :param now: DHT time for the expiry check (``hivemind.get_dht_time()``); ``None`` skips it.
    """
    return [record for record, _ in parse_owned_entry(entry, parse, now=now)]


def parse_owned_entry(entry: Any, parse: Callable[[Any], R], *, now: float | None = None) -> list[tuple[R, bytes]]:
    """Like :func:`parse_entry`, each record with its owner's public key (the key that signed it)."""
    if entry is None or not isinstance(entry.value, dict):
        return []
    out: list[tuple[R, bytes]] = []
    for subkey, item in entry.value.items():
        owner = subkey_peer_id(subkey)
        if owner is None:
            logger.debug("skipping unsigned subkey %r", subkey)
            continue
        if now is not None and item.expiration_time < now:
            continue
        if is_tombstone(item.value):
            continue
        try:
            record = parse(item.value)
        except RecordError as exc:
            logger.debug("skipping invalid record from %s: %s", owner, exc)
            continue
        if record.peer_id != owner:
            logger.debug("skipping record claiming peer %s under subkey of %s", record.peer_id, owner)
            continue
        key = subkey_owner_key(subkey)
        if key is not None:
            out.append((record, key))
    return out


def parse_node_records(entry: Any, *, now: float | None = None) -> list[NodeRecord]:
    """Valid :class:`NodeRecord` s from ``dht.get(NODES_KEY, latest=True)``."""
    return parse_entry(entry, NodeRecord.from_dict, now=now)


def parse_owned_node_records(entry: Any, *, now: float | None = None) -> list[tuple[NodeRecord, bytes]]:
    """Valid :class:`NodeRecord` s with their owners' public keys: who may sign results as that node."""
    return parse_owned_entry(entry, NodeRecord.from_dict, now=now)


def parse_owned_block_records(entry: Any, *, now: float | None = None) -> list[tuple[BlockRecord, bytes]]:
    """Valid :class:`BlockRecord` s with their owners' public keys."""
    return parse_owned_entry(entry, BlockRecord.from_dict, now=now)

