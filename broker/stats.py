"""Counters of one broker process (for logs, the benchmark and tests)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from proto.topology import PRIORITIES


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100.0 * (len(ordered) - 1))))
    return ordered[index]


@dataclass
class BrokerStats:
    consumed: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PRIORITIES, 0))
    routed: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PRIORITIES, 0))
    by_group: dict[str, int] = field(default_factory=dict)
    refused: dict[str, int] = field(default_factory=dict)  # error code name -> count
    requeued: int = 0
    crashed: int = 0
    reconnects: int = 0
    unrecorded: int = 0  # routing records RabbitMQ refused (those requests are not judged for reputation)
    sched_ms: deque[float] = field(default_factory=lambda: deque(maxlen=200_000))  # parse..decision, per request
    # the selection alone (Router.route: candidates, features, policy.select, decision), per routed request; the
    # part of sched_ms that a scheduler changes (parse, validate and serialise are the same for every policy)
    select_ms: deque[float] = field(default_factory=lambda: deque(maxlen=200_000))

    @property
    def routed_total(self) -> int:
        return sum(self.routed.values())

    def snapshot(self) -> dict[str, Any]:
        samples = list(self.sched_ms)
        return {
            "consumed": dict(self.consumed),
            "routed": dict(self.routed),
            "routed_total": self.routed_total,
            "by_group": dict(self.by_group),
            "refused": dict(self.refused),
            "requeued": self.requeued,
            "crashed": self.crashed,
            "reconnects": self.reconnects,
            "unrecorded": self.unrecorded,
            "sched_p50_ms": round(percentile(samples, 50), 4),
            "sched_p99_ms": round(percentile(samples, 99), 4),
            "select_p50_ms": round(percentile(list(self.select_ms), 50), 4),
            "select_p99_ms": round(percentile(list(self.select_ms), 99), 4),
        }
