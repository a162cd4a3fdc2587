"""The node's id when no DHT key pair names it: made once and kept in the state directory.

A restarted node keeps its id, so the dedup ledger, telemetry and the brokers' view of it
stay attached to one name. Nodes in the DHT use their peer id instead (:mod:`node.daemon`).
"""

from __future__ import annotations

import secrets
import socket
from pathlib import Path

NODE_ID_FILE = "node_id"


def stable_node_id(state_dir: Path) -> str:
    """The node's id, made once (host name + random suffix) and kept in the state directory."""
    path = state_dir / NODE_ID_FILE
    if path.exists():
        existing = path.read_text(encoding="utf-8").strip()
        if existing:
            return existing
    host = "".join(c if c.isalnum() or c in "-_." else "-" for c in socket.gethostname())[:40] or "node"
    node_id = f"{host}-{secrets.token_hex(3)}"
    path.write_text(node_id + "\n", encoding="utf-8")
    return node_id
