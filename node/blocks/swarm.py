"""``dinet-node swarm`` (what the swarm serves, and its gaps) and ``dinet-node dht`` (a bootstrap peer).

Both are registered in node/__main__.py with :func:`add_swarm_parser` / :func:`add_dht_parser`.
:func:`summarize` is the pure part: live node records -> nodes, per-model block coverage and gaps, and
for each node id what the DHT shows of its owner (:func:`identity_of`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

from proto.node_identity import names_a_key, self_certifies
from proto.records import NodeRecord

logger = logging.getLogger(__name__)


def identity_of(node_id: str, writer: bytes, claimants: Collection[bytes]) -> str:
    """What the DHT shows of one record: did the key that wrote it (``writer``) own ``node_id``?

    ``self-certified``: the id derives from the writer's key (brokers and agents credit only that key);
    ``impostor``: the id derives from another key; ``ambiguous``: several keys (``claimants``, the writer
    among them) claim an id that names none of them; ``unverified``: the only claimant of an id of another
    form (legacy ids, ``--node-id``).
    """
    if self_certifies(node_id, writer):
        return "self-certified"
    if names_a_key(node_id):
        return "impostor (the id derives from another key)"
    return f"ambiguous ({len(claimants)} keys claim it)" if len(claimants) > 1 else "unverified"


def _identities(records: Sequence[NodeRecord], writers: Sequence[bytes]) -> list[str]:
    claimants: dict[str, set[bytes]] = {}
    for record, writer in zip(records, writers, strict=True):
        claimants.setdefault(record.peer_id, set()).add(writer)
    return [identity_of(r.peer_id, w, claimants[r.peer_id]) for r, w in zip(records, writers, strict=True)]


def summarize(records: Sequence[NodeRecord], writers: Sequence[bytes] | None = None) -> dict[str, Any]:
    """Nodes, and for each model the number of live servers of every block and the uncovered blocks.

    :param writers: the key that wrote each record, in the order of ``records``
        (``SwarmDHT.owned_node_records``); without it every node's ``identity`` is ``unknown``.
    """
    identities = ["unknown"] * len(records) if writers is None else _identities(records, writers)
    ordered = sorted(zip(records, identities, strict=True), key=lambda p: (p[0].models, p[0].start_block, p[0].peer_id))
    nodes = [
        {
            "peer_id": r.peer_id, "address": r.address or "(queue only)", "group": r.group, "models": list(r.models),
            "blocks": f"{r.start_block}:{r.end_block}", "throughput_tok_s": r.throughput_tok_s, "load": r.load,
            "free_cache_mb": round(r.free_cache_bytes / 2**20, 1), "accelerator": r.hardware.accelerator,
            "weight_format": r.hardware.weight_format, "gflops": r.hardware.gflops,
            "identity": identity,
        }
        for r, identity in ordered
    ]
    models: dict[str, dict[str, Any]] = {}
    for model in sorted({m for r in records for m in r.models}):
        serving = [r for r in records if model in r.models and r.serves_blocks]
        queue_only = sum(model in r.models and not r.serves_blocks for r in records)
        total = max([r.num_blocks for r in serving] + [r.end_block for r in serving] + [0])
        coverage = [sum(r.start_block <= b < r.end_block for r in serving) for b in range(total)]
        models[model] = {
            "num_blocks": total,
            "num_blocks_known": any(r.num_blocks for r in serving),
            "servers_per_block": coverage,
            "gaps": _ranges([b for b, n in enumerate(coverage) if n == 0]),
            "complete": bool(coverage) and all(coverage),
            # whole-model nodes (e.g. vLLM) that take queue tasks but serve no blocks to chains
            "queue_only_nodes": queue_only,
        }
    return {"nodes": nodes, "models": models}


def _ranges(blocks: list[int]) -> list[str]:
    out: list[str] = []
    for b in blocks:
        if out and int(out[-1].split(":")[1]) == b:
            out[-1] = f"{out[-1].split(':')[0]}:{b + 1}"
        else:
            out.append(f"{b}:{b + 1}")
    return out


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"{len(summary['nodes'])} live node(s)"]
    for n in summary["nodes"]:
        lines.append(
            f"  {n['peer_id'][:16]}…  {n['address']:<21} group={n['group']:<10} {','.join(n['models'])} "
            f"blocks {n['blocks']:<7} {n['throughput_tok_s']:.1f} tok/s load {n['load']:.2f} "
            f"free cache {n['free_cache_mb']} MiB {n['accelerator']} {n['weight_format']} id {n['identity']}"
        )
    for model, m in summary["models"].items():
        if m.get("queue_only_nodes"):
            lines.append(f"model {model}: {m['queue_only_nodes']} whole-model node(s) taking queue tasks only")
        if not m["servers_per_block"]:
            lines.append(f"model {model}: no block servers (no chain can be built)")
            continue
        state = "complete" if m["complete"] else f"GAPS at blocks {', '.join(m['gaps'])}"
        lines.append(f"model {model}: {m['num_blocks']} blocks, servers per block {m['servers_per_block']} - {state}")
        if not m["num_blocks_known"]:
            lines.append("  (no node announced the model's block count: trailing gaps cannot be seen)")
    return "\n".join(lines)


async def _swarm(args: argparse.Namespace) -> int:
    from node.blocks.dht import SwarmDHT

    swarm = await asyncio.to_thread(SwarmDHT.start, initial_peers=args.initial_peers, client_mode=True)
    try:
        owned = await asyncio.wait_for(swarm.owned_node_records(), args.timeout)
    finally:
        await asyncio.to_thread(swarm.shutdown)
    summary = summarize([record for record, _ in owned], [key for _, key in owned])
    print(json.dumps(summary) if args.json else format_summary(summary))
    return 0


def add_swarm_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "swarm", help="print the live swarm: nodes, block coverage per model, gaps",
        description="Joins the DHT as a client, reads every node record, and prints what is served.",
    )
    parser.add_argument("--initial-peers", nargs="+", required=True, help="multiaddrs of DHT peers to join through")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--timeout", type=float, default=15.0, help="seconds to wait for the DHT (default 15)")
    parser.set_defaults(func=lambda args: asyncio.run(_swarm(args)))
    return parser


async def _dht(args: argparse.Namespace) -> int:
    from node.blocks.dht import SwarmDHT

    swarm = await asyncio.to_thread(
        SwarmDHT.start, initial_peers=args.initial_peers, host=args.host, port=args.port,
    )
    maddrs = swarm.maddrs
    if args.maddrs_file:
        Path(args.maddrs_file).write_text("\n".join(maddrs) + "\n")
    print(json.dumps({"peer_id": swarm.peer_id, "dht_maddrs": maddrs}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await asyncio.to_thread(swarm.shutdown)
    return 0


def add_dht_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "dht", help="run a standalone bootstrap DHT peer",
        description="A DHT peer that serves no blocks: a stable address for nodes to join through. "
        "Prints its multiaddrs as JSON and runs until SIGINT/SIGTERM.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="listen port (default: any free)")
    parser.add_argument("--initial-peers", nargs="*", default=[], help="join an existing swarm through these")
    parser.add_argument("--maddrs-file", default=None, help="also write the multiaddrs here, one per line")
    parser.set_defaults(func=lambda args: asyncio.run(_dht(args)))
    return parser
