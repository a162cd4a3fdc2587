"""The task worker's knobs and counters, shared by the consumer (:mod:`node.worker`) and the
per-task code (:mod:`node.task_answer`) without either importing the other's internals."""

from __future__ import annotations

from dataclasses import dataclass, field

from node.validation import Limits
from proto.records import HardwareInfo
from proto.topology import DEFAULT_NAMESPACE


@dataclass
class WorkerConfig:
    """Knobs of one task worker."""

    node_id: str  # stable identity of this node (reports, chunks, reputation)
    group: str  # consumer group whose queue this node consumes
    limits: Limits  # model served and the sizes accepted
    namespace: str = DEFAULT_NAMESPACE  # RabbitMQ namespace (queue name prefix)
    prefetch: int = 4  # tasks taken at once from the group queue, and computed concurrently
    chunk_max_tokens: int = 32  # most tokens in one TokenChunk
    drain_grace_s: float = 30.0  # on shutdown, how long running tasks may take before they are requeued
    telemetry_lookback_s: float = 24 * 3600.0  # how far back to replay telemetry for dedup; 0 = do not
    publish_timeout_s: float = 30.0  # a publish not confirmed by then counts as a transport failure
    hardware: HardwareInfo = field(default_factory=HardwareInfo)  # measured profile, sent in reports


@dataclass
class WorkerStats:
    """Counters since start (also handy in tests)."""

    completed: int = 0  # answered with tokens
    failed: int = 0  # answered with a typed error
    deduplicated: int = 0  # skipped: already answered
    requeued: int = 0  # handed back to the queue (engine failure, shutdown)
    dead_lettered: int = 0  # rejected to the dead-letter queue
