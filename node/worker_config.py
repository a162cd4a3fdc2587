"""The task worker's knobs and counters, shared by the consumer (:mod:`node.worker`) and the
per-task code (:mod:`node.task_answer`, :mod:`node.task_outcomes`) without either importing the other's internals."""

from __future__ import annotations

from dataclasses import dataclass, field

from broker.config import ReputationConfig
from node.fence import check_reputation_config
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
    # -- reputation fence (node/fence.py): stop consuming while the brokers' ledger says node_id is below threshold
    reputation: ReputationConfig = field(default_factory=ReputationConfig)  # must match the brokers' settings
    fence: bool = True  # off: consume whatever the ledger says (the brokers still route around the node)
    fence_check_s: float = 2.0  # how often the ledger is read again (evidence aged to now)
    fence_catch_up_s: float = 10.0  # at start, how long the stream replay may take before the first verdict

    def __post_init__(self) -> None:
        check_reputation_config(self.reputation)
        for name in ("fence_check_s", "fence_catch_up_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")


@dataclass
class WorkerStats:
    """Counters since start (also handy in tests)."""

    completed: int = 0  # answered with tokens
    failed: int = 0  # answered with a typed error
    deduplicated: int = 0  # skipped: already answered
    requeued: int = 0  # handed back to the queue (engine failure, shutdown)
    dead_lettered: int = 0  # rejected to the dead-letter queue
