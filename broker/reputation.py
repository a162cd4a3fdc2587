"""Per-node reputation computed from the telemetry stream, with decay in time.

Every broker feeds the same stream, in the same order, into a :class:`ReputationLedger`,
so every broker (and `dinet-broker status`) rebuilds the same table. Evidence is
aged by the *event* time of the reports (their ``finished_at``), never by the wall
clock of the consumer, so a replay after a restart gives the same scores; only the
final read-out ages the evidence to "now".

Score of a node, in [0, 1]::

    success = (S + w * prior) / (S + F + w)         S, F: decayed successes / failures
    latency = 0.5 + 0.5 * (L + w) / (n + w)          L: decayed sum of min(1, actual/predicted) over n
    score   = success * latency

A failure is a node-side error (NODE_FAILURE, INTERNAL, unspecified), a deadline the
node missed after starting work (weighted ``timeout_weight``), or a stall: a
successful run at less than ``stall_ratio`` of the throughput the scheduler
predicted. Errors that are the client's fault (bad prompt, budget, ...) are neutral.
Latency alone cannot push a node below 0.5: a mispredicting scheduler must not
ban the whole swarm. A node's own claims (self-reported scores) are never read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from broker.config import ReputationConfig
from proto import messages_pb2
from proto.common_pb2 import ErrorCode

NODE_FAULTS = frozenset({ErrorCode.ERROR_CODE_UNSPECIFIED, ErrorCode.NODE_FAILURE, ErrorCode.INTERNAL})


@dataclass
class NodeStanding:
    """Decayed evidence about one node, as of event time ``updated_at``."""

    node_id: str
    group: str = ""
    successes: float = 0.0
    failures: float = 0.0
    latency_sum: float = 0.0
    latency_n: float = 0.0
    updated_at: float = 0.0  # event time of the evidence above
    reports: int = 0  # reports ever seen (not decayed)
    last_error: str = ""

    def decayed(self, now: float, half_life_s: float) -> NodeStanding:
        """A copy aged to ``now`` (event time never runs backwards)."""
        factor = _decay(now - self.updated_at, half_life_s)
        return NodeStanding(
            node_id=self.node_id,
            group=self.group,
            successes=self.successes * factor,
            failures=self.failures * factor,
            latency_sum=self.latency_sum * factor,
            latency_n=self.latency_n * factor,
            updated_at=max(now, self.updated_at),
            reports=self.reports,
            last_error=self.last_error,
        )


def _decay(dt: float, half_life_s: float) -> float:
    return 0.5 ** (dt / half_life_s) if dt > 0 else 1.0


@dataclass(frozen=True)
class NodeReputation:
    """One row of the reputation table."""

    node_id: str
    group: str
    score: float
    eligible: bool
    successes: float
    failures: float
    reports: int
    last_seen: float
    last_error: str


class ReputationLedger:
    """Folds TimingReports into per-node standings; read scores with :meth:`score`."""

    def __init__(self, config: ReputationConfig | None = None) -> None:
        self.config = config or ReputationConfig()
        self._nodes: dict[str, NodeStanding] = {}
        self.observed = 0  # reports folded in

    def observe(self, report: messages_pb2.TimingReport) -> None:
        if not report.node_id:
            return
        cfg = self.config
        node = self._nodes.get(report.node_id)
        if node is None:
            node = self._nodes[report.node_id] = NodeStanding(report.node_id)
        when = report.finished_at if math.isfinite(report.finished_at) and report.finished_at > 0 else 0.0
        when = max(when, node.updated_at)
        aged = node.decayed(when, cfg.half_life_s)
        aged.group = report.group or node.group
        aged.reports += 1
        if report.ok:
            predicted = report.decision.predicted_tokens_per_s
            actual = report.timing.tokens_per_s
            if predicted > 0 and math.isfinite(predicted) and math.isfinite(actual) and actual >= 0:
                ratio = actual / predicted
                aged.latency_sum += min(1.0, ratio)
                aged.latency_n += 1.0
                if ratio < cfg.stall_ratio:
                    aged.failures += 1.0
                    aged.last_error = "STALL"
                else:
                    aged.successes += 1.0
            else:
                aged.successes += 1.0
        elif report.error_code == ErrorCode.DEADLINE_EXCEEDED:
            if report.timing.total_s > 0:  # it started and then missed it: the node stalled
                aged.failures += cfg.timeout_weight
                aged.last_error = "TIMEOUT"
        elif report.error_code in NODE_FAULTS:
            aged.failures += 1.0
            aged.last_error = ErrorCode.Name(report.error_code)
        self._nodes[report.node_id] = aged
        self.observed += 1

    def score(self, node_id: str, now: float) -> float:
        node = self._nodes.get(node_id)
        if node is None:
            return self.config.prior
        return self._score(node.decayed(now, self.config.half_life_s))

    def _score(self, node: NodeStanding) -> float:
        cfg = self.config
        w = cfg.prior_weight
        success = (node.successes + w * cfg.prior) / (node.successes + node.failures + w)
        latency = 0.5 + 0.5 * (node.latency_sum + w) / (node.latency_n + w)
        return max(0.0, min(1.0, success * latency))

    def eligible(self, node_id: str, now: float) -> bool:
        return self.score(node_id, now) >= self.config.threshold

    def nodes_of_group(self, group: str, now: float) -> list[str]:
        """Nodes that reported for ``group`` within ``node_seen_ttl_s`` (event time)."""
        horizon = now - self.config.node_seen_ttl_s
        return sorted(
            n.node_id for n in self._nodes.values() if n.group == group and n.updated_at >= horizon
        )

    def table(self, now: float) -> list[NodeReputation]:
        rows = []
        for node in self._nodes.values():
            aged = node.decayed(now, self.config.half_life_s)
            score = self._score(aged)
            rows.append(
                NodeReputation(
                    node_id=node.node_id,
                    group=node.group,
                    score=round(score, 4),
                    eligible=score >= self.config.threshold,
                    successes=round(aged.successes, 3),
                    failures=round(aged.failures, 3),
                    reports=node.reports,
                    last_seen=node.updated_at,
                    last_error=node.last_error,
                )
            )
        return sorted(rows, key=lambda r: (r.group, r.node_id))
