"""`dinet-broker status`: the operator's view, without the management plugin.

Queue depths come from passive declares (which also return the consumer count);
consumer groups, their nodes and reputations, request rates and the schedulers in
use come from replaying the telemetry stream into the same :class:`ReputationLedger`
the brokers keep (so status shows the very table the brokers route with).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import aio_pika
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage
from aiormq.exceptions import ChannelClosed

from broker.config import ReputationConfig
from broker.deadletters import watch_queue_spec
from broker.directory import GroupDirectory
from broker.reputation import ReputationLedger
from broker.telemetry import TelemetryConsumer
from proto.topology import PRIORITIES, Topology


async def queue_depth(connection: AbstractConnection, name: str) -> dict[str, Any]:
    """Messages and consumers of one queue via a passive declare (a missing queue is reported, not created)."""
    channel = await connection.channel()
    try:
        queue = await channel.declare_queue(name, passive=True)
    except ChannelClosed:
        return {"queue": name, "exists": False, "messages": 0, "consumers": 0}
    result = queue.declaration_result
    await channel.close()
    return {"queue": name, "exists": True, "messages": result.message_count, "consumers": result.consumer_count}


class _Recorder:
    """Collects what status needs from each report besides the ledger."""

    def __init__(self) -> None:
        self.reports: list[tuple[float, str, bool, str, str]] = []  # finished_at, group, ok, scheduler, version

    def observe(self, report: Any) -> None:
        self.reports.append(
            (report.finished_at, report.group, report.ok, report.decision.scheduler, report.decision.model_version)
        )


async def replay_telemetry(
    connection: AbstractConnection, topology: Topology, ledger: ReputationLedger, *, timeout_s: float = 15.0
) -> _Recorder:
    recorder = _Recorder()
    consumer = TelemetryConsumer(topology, ledger, [recorder], prefetch=2000)
    channel = await connection.channel()
    try:
        await channel.set_qos(prefetch_count=consumer.prefetch)
        queue = await channel.declare_queue(topology.telemetry_stream, passive=True)
    except ChannelClosed:
        return recorder
    done = asyncio.Event()

    async def on_message(message: AbstractIncomingMessage) -> None:
        raw = (message.headers or {}).get("x-stream-offset")
        consumer.handle(message.body, int(raw) if isinstance(raw, int) else None, message.type)
        await message.ack()
        done.clear()

    await queue.consume(on_message, arguments={"x-stream-offset": "first"})
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:  # stop once the stream goes quiet
        done.set()
        await asyncio.sleep(0.4)
        if done.is_set():
            break
    await channel.close()
    return recorder


async def collect_status(
    amqp_url: str,
    topology: Topology,
    *,
    directory: GroupDirectory | None = None,
    reputation: ReputationConfig | None = None,
    window_s: float = 60.0,
) -> dict[str, Any]:
    # the owners of the nodes' DHT records decide who may sign for a node, as in the brokers' ledgers
    ledger = ReputationLedger(reputation, owner_key=directory.owner_key if directory is not None else None)
    connection = await aio_pika.connect(amqp_url, timeout=10)
    try:
        recorder = await replay_telemetry(connection, topology, ledger)
        now = time.time()
        table = ledger.table(now)
        groups: dict[str, dict[str, Any]] = {}
        for info in directory.all_groups() if directory else []:
            groups[info.group] = {"group": info.group, "models": sorted(info.models), "source": info.source,
                                  "announced_nodes": list(info.nodes),
                                  "methods": sorted(info.methods) or "all"}
        for row in table:
            groups.setdefault(row.group, {"group": row.group, "models": [], "source": "telemetry",
                                          "announced_nodes": [], "methods": "all"})
        recent = [r for r in recorder.reports if r[0] >= now - window_s]
        per_group = Counter(r[1] for r in recent)
        for name, entry in groups.items():
            # a node the ledger remembers (telemetry history) but that no longer announces itself is gone:
            # the operator should not read its old reputation as a live member of the group
            announced = set(entry["announced_nodes"]) if entry["source"] == "dht" else None
            entry["nodes"] = [{**vars(row), "live": None if announced is None else row.node_id in announced}
                              for row in table if row.group == name]
            entry["completed_per_s"] = round(per_group.get(name, 0) / window_s, 3)
            entry["queue"] = await queue_depth(connection, topology.group_queue(name))
        queues = [await queue_depth(connection, topology.request_queue(p)) for p in PRIORITIES]
        dead = await queue_depth(connection, topology.dead_letter_queue)
        watch = await queue_depth(connection, watch_queue_spec(topology).name)
        schedulers = Counter((r[3] or "?", r[4]) for r in recorder.reports[-1000:])
    finally:
        await connection.close()
    return {
        "namespace": topology.namespace,
        "time": now,
        "window_s": window_s,
        "request_queues": queues,
        "dead_letters": dead,
        "dead_letter_watch": watch,
        "groups": [groups[k] for k in sorted(groups)],
        "rates": {
            "completed_per_s": round(len(recent) / window_s, 3),
            "failed_per_s": round(sum(1 for r in recent if not r[2]) / window_s, 3),
        },
        "telemetry_reports": len(recorder.reports),  # nodes' own TimingReports
        # agents' outcomes: judged (moved a score), unattributed (no node to blame), ignored (by reason)
        "outcomes": {"judged": ledger.observed, "unattributed": ledger.unattributed, "ignored": dict(ledger.ignored)},
        "schedulers": [{"scheduler": s, "version": v, "decisions": n} for (s, v), n in schedulers.most_common()],
        "reputation_threshold": ledger.config.threshold,
        # node ids several DHT keys claim, none self-certified: answers in their name are credited to nobody
        "ambiguous_nodes": directory.ambiguous_nodes() if directory is not None else [],
    }


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[str(c) for c in row] for row in [headers, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_status(status: dict[str, Any]) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(status["time"]))
    out = [f"dinet namespace {status['namespace']!r} at {when}"]
    q_rows = [[q["queue"], q["messages"] if q["exists"] else "(missing)", q["consumers"]]
              for q in [*status["request_queues"], status["dead_letters"]]]
    q_rows += [[g["queue"]["queue"], g["queue"]["messages"] if g["queue"]["exists"] else "(missing)",
                g["queue"]["consumers"]] for g in status["groups"]]
    out += ["", "Queues", _table(["queue", "messages", "consumers"], q_rows)]
    node_rows: list[list[Any]] = []
    for g in status["groups"]:
        models = ",".join(g["models"]) or "?"
        if g.get("methods", "all") != "all":  # a group that runs only some methods (e.g. a vLLM group)
            models += f" [{'+'.join(g['methods'])}]"
        if not g["nodes"]:
            node_rows.append([g["group"], models, g["source"], "-", "-", "-", "-", "-", g["completed_per_s"]])
        for n in g["nodes"]:
            live = {True: "yes", False: "gone", None: "-"}[n.get("live")]
            node_rows.append([g["group"], models, g["source"], n["node_id"], live, f"{n['score']:.3f}",
                              "yes" if n["eligible"] else "NO", n["reports"], g["completed_per_s"]])
    out += ["", f"Consumer groups (reputation threshold {status['reputation_threshold']})",
            _table(["group", "models", "source", "node", "in DHT", "reputation", "gets work", "reports", "done/s"],
                   node_rows) if node_rows else "(no groups known: no static groups, DHT records or telemetry)"]
    rates = status["rates"]
    out += ["", f"Rates over the last {status['window_s']:.0f}s: {rates['completed_per_s']} completed/s, "
            f"{rates['failed_per_s']} failed/s ({status['telemetry_reports']} telemetry reports in total)"]
    seen = status.get("outcomes", {})
    if seen:
        out.append(f"Agents' outcomes: {seen['judged']} judged, {seen['unattributed']} with no node to blame, "
                   f"{sum(seen['ignored'].values())} ignored")
    if status.get("ambiguous_nodes"):
        out.append(f"Claimed by several DHT keys, credited to nobody: {', '.join(status['ambiguous_nodes'])}")
    dead = status["dead_letters"]
    out.append(f"Dead letters: {dead['messages']} in {dead['queue']}")
    sched = ", ".join(f"{s['scheduler']}{'@' + s['version'] if s['version'] else ''} ({s['decisions']})"
                      for s in status["schedulers"]) or "none seen yet"
    out.append(f"Schedulers in recent decisions: {sched}")
    return "\n".join(out)
