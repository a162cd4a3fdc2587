"""The broker's one typed configuration object, one commented line per knob."""

from __future__ import annotations

import math
import os
import socket
import uuid
from dataclasses import dataclass, field

from broker.priority import check_realtime_priority
from proto.methods import METHODS
from proto.settings import DEFAULT_AMQP_URL
from proto.topology import DEFAULT_NAMESPACE, PRIORITIES, validate_name


def default_broker_id() -> str:
    """hostname-pid-random: unique per process, readable in logs and routing decisions."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True)
class ValidationLimits:
    """Hard bounds on what an agent may ask for (a request comes from a stranger)."""

    max_prompt_chars: int = 32_768  # longer prompts get PROMPT_TOO_LONG
    min_new_tokens: int = 1
    max_new_tokens: int = 4096  # outside [min, max] -> MAX_NEW_TOKENS_OUT_OF_RANGE
    max_request_id_chars: int = 128
    max_model_chars: int = 256
    max_temperature: float = 10.0
    max_body_bytes: int = 1_048_576  # a bigger message is MALFORMED_MESSAGE before parsing


@dataclass(frozen=True)
class ReputationConfig:
    """How telemetry turns into a per-node score in [0, 1] (see broker/reputation.py)."""

    half_life_s: float = 300.0  # evidence loses half its weight every half_life_s of event time
    threshold: float = 0.5  # nodes scoring below this get no work
    prior: float = 1.0  # score of a node nobody has judged yet
    prior_weight: float = 2.0  # how many observations the prior is worth
    timeout_weight: float = 2.0  # a timeout counts as this many failures
    stall_ratio: float = 0.25  # actual/predicted tokens/s below this counts as a stall (a failure)
    node_seen_ttl_s: float = 600.0  # a node judged by no outcome for this long leaves static groups' node lists
    pending_routes: int = 100_000  # routing records awaiting their agent's outcome (oldest dropped first)

    def __post_init__(self) -> None:
        check_reputation_config(self)


def check_reputation_config(config: ReputationConfig) -> ReputationConfig:
    """Brokers and fencing nodes use these knobs; a typo fails at start instead of banning or fencing everyone.

    :raises ValueError: naming the knob and its valid range.
    """
    for name, value in (("threshold", config.threshold), ("prior", config.prior), ("stall_ratio", config.stall_ratio)):
        if not math.isfinite(value) or not 0.0 <= value <= 1.0:
            raise ValueError(f"reputation {name} must be in [0, 1], got {value!r}")
    if config.threshold > config.prior:
        raise ValueError(f"reputation threshold {config.threshold} is above the prior {config.prior}: a node's score "
                         "decays back to the prior, so a fenced node could never return; lower the threshold")
    positive = {"half_life_s": config.half_life_s, "prior_weight": config.prior_weight,
                "node_seen_ttl_s": config.node_seen_ttl_s}
    for name, value in positive.items():
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"reputation {name} must be a finite number > 0, got {value!r}")
    if not math.isfinite(config.timeout_weight) or config.timeout_weight < 0:
        raise ValueError(f"reputation timeout_weight must be a finite number >= 0, got {config.timeout_weight!r}")
    if config.pending_routes < 1:
        raise ValueError(f"reputation pending_routes must be >= 1, got {config.pending_routes!r}")
    return config


@dataclass(frozen=True)
class BrokerConfig:
    """Everything a `dinet-broker run` process needs; built from the CLI in broker/__main__.py."""

    amqp_url: str = DEFAULT_AMQP_URL  # from --amqp-url / DINET_AMQP_URL
    namespace: str = DEFAULT_NAMESPACE  # prefix of every queue name
    broker_id: str = field(default_factory=default_broker_id)  # recorded in each RoutingDecision
    scheduler: str = "fixed-rule"  # policy name ("fixed-rule", "metainf") or "module:factory"
    scheduler_model: str = ""  # model file/dir handed to a learned policy's factory
    # -- directory of consumer groups --
    initial_peers: tuple[str, ...] = ()  # hivemind multiaddrs; empty and dht=False -> static directory only
    dht: bool = False  # start/join a DHT even without initial peers (prints its addresses)
    static_groups: dict[str, tuple[str, ...]] = field(default_factory=dict)  # group -> models served
    # group -> the only methods its nodes run (a vLLM group is built for one method); absent = every method.
    # For a DHT group the nodes' records may say the same; both apply.
    group_methods: dict[str, tuple[str, ...]] = field(default_factory=dict)
    directory_ttl_s: float = 3.0  # how long a DHT listing of groups is trusted before it is refreshed
    # -- consuming and publishing --
    prefetch: dict[str, int] = field(
        default_factory=lambda: {"high": 512, "normal": 512, "batch": 256}
    )  # unacked requests per priority consumer
    weights: dict[str, int] = field(
        default_factory=lambda: {"high": 8, "normal": 3, "batch": 1}
    )  # share of routing slots each priority gets while all are busy (batch is never starved)
    # requests between delivery and their task's confirm (each waits for its routing record's confirm first, up to
    # ~5 ms + two confirms): 128 capped metainf routing at ~1,300/s on the 2-core VM, 512 gave ~1,750/s
    max_in_flight: int = 512
    # route the requests of one loop turn in one batched prediction (learned policies): ~20 % more requests/s
    # with MetaInf, but every request waits for the rest of its loop turn (off: sched latency first)
    batch_routing: bool = False
    reconnect_interval_s: float = 1.0  # pause between attempts to reach RabbitMQ again after losing it
    publish_timeout_s: float = 30.0  # a confirm slower than this requeues the request
    watch_dead_letters: bool = True  # notify senders of messages RabbitMQ dead-lettered on its own
    telemetry_prefetch: int = 256  # stream credit for the telemetry consumer
    # publish a RoutingRecord (the decision, keyed by request id) to the telemetry stream before each
    # RoutedTask: reputation judges a node's speed against it. Off = no latency/stall judgement at all
    record_routes: bool = True
    # SCHED_FIFO priority of the event loop (1..99; 0 = the normal policy): keeps co-located processes from
    # preempting routing decisions (broker/priority.py)
    realtime_priority: int = 0
    limits: ValidationLimits = field(default_factory=ValidationLimits)
    reputation: ReputationConfig = field(default_factory=ReputationConfig)

    def __post_init__(self) -> None:
        validate_name("namespace", self.namespace)
        for group, models in self.static_groups.items():
            validate_name("group name", group)
            if not models:
                raise ValueError(f"static group {group!r} serves no model; write GROUP=MODEL[,MODEL]")
        for group, methods in self.group_methods.items():
            validate_name("group name", group)
            check_methods(f"group {group!r}", methods)
        for name, table in (("prefetch", self.prefetch), ("weights", self.weights)):
            missing = [p for p in PRIORITIES if table.get(p, 0) < 1]
            if missing:
                raise ValueError(f"{name} must be >= 1 for every priority; fix {', '.join(missing)}")
        if self.max_in_flight < 1:
            raise ValueError("max_in_flight must be >= 1")
        if self.directory_ttl_s <= 0:
            raise ValueError("directory_ttl_s must be > 0")
        check_realtime_priority(self.realtime_priority)

    @property
    def use_dht(self) -> bool:
        return self.dht or bool(self.initial_peers)


def check_methods(owner: str, methods: tuple[str, ...]) -> tuple[str, ...]:
    """:raises ValueError: no method, or one that :data:`proto.methods.METHODS` does not know."""
    unknown = [m for m in methods if m not in METHODS]
    if not methods or unknown:
        raise ValueError(f"{owner}: methods must be a non-empty list of {', '.join(METHODS)}; got {list(methods)}")
    return methods


def parse_group_methods(text: str) -> tuple[str, tuple[str, ...]]:
    """``GROUP=METHOD[,METHOD...]`` -> (group, methods).

    :raises ValueError: naming the expected form or the unknown method.
    """
    group, sep, methods = text.partition("=")
    names = tuple(m.strip() for m in methods.split(",") if m.strip())
    if not sep or not group.strip():
        raise ValueError(f"--group-methods {text!r}: expected GROUP=METHOD[,METHOD...], e.g. gpu=continuous_batching")
    return validate_name("group name", group.strip()), check_methods(f"--group-methods {text!r}", names)


def parse_static_group(text: str) -> tuple[str, tuple[str, ...]]:
    """``GROUP=MODEL[,MODEL...]`` -> (group, models).

    :raises ValueError: naming the expected form.
    """
    group, sep, models = text.partition("=")
    names = tuple(m.strip() for m in models.split(",") if m.strip())
    if not sep or not group.strip() or not names:
        raise ValueError(f"--static-group {text!r}: expected GROUP=MODEL[,MODEL...], e.g. cpu-fp32=tiny")
    return validate_name("group name", group.strip()), names
