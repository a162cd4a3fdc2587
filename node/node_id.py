"""The node's id: the libp2p peer id of the key it signs with, kept in the state directory.

A node's key lives in its state directory (:meth:`proto.result_signing.ResultSigner.load_or_create`),
and its id derives from that key (:func:`proto.node_identity.peer_id_of`), in the DHT or not: in the
DHT the same key is its libp2p identity (:meth:`node.blocks.dht.SwarmDHT.start`), so its peer id *is*
this id. Whoever holds one of its signed results can check the id against the signer with no lookup,
and a restarted node keeps its id, so the dedup ledger, telemetry and the brokers' reputation of it
stay attached to one name.

State directories made before ids were derived from keys hold a ``host-xxxxxx`` id in ``node_id``;
such a node keeps that id while it runs without a DHT (it is not self-certifying, and is judged by the
checks that apply to any unconfirmed signer). In the DHT a node is always named by its peer id.
"""

from __future__ import annotations

from pathlib import Path

from proto.node_identity import peer_id_of

NODE_ID_FILE = "node_id"


class NodeIdentityError(RuntimeError):
    """The node cannot start under its identity (its state directory, key or id); ``dinet-node run`` exits 2."""


class NodeKeyError(NodeIdentityError):
    """The node's key cannot be read, or is not an RSA key a peer id can derive from."""


def stable_node_id(state_dir: Path, public_key: bytes) -> str:
    """The node's id: the one recorded in the state directory, else the peer id of ``public_key`` (recorded).

    :raises NodeKeyError: no peer id derives from ``public_key``.
    """
    path = state_dir / NODE_ID_FILE
    if path.exists():
        existing = path.read_text(encoding="utf-8").strip()
        if existing:
            return existing
    node_id = peer_id_of(public_key)
    if node_id is None:
        raise NodeKeyError("the node's key in its state directory is not an RSA key; no peer id derives from it")
    path.write_text(node_id + "\n", encoding="utf-8")
    return node_id
