"""The agent's knobs, one typed config with each field explained where it is declared."""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field

from agent.owners import check_initial_peers
from proto.settings import DEFAULT_AMQP_URL
from proto.topology import DEFAULT_NAMESPACE, DEFAULT_PRIORITY, PRIORITIES, validate_name


def new_agent_id() -> str:
    return f"agent-{secrets.token_hex(6)}"


@dataclass
class AgentConfig:
    """How an :class:`agent.client.Agent` talks to a dinet deployment."""

    amqp_url: str = DEFAULT_AMQP_URL  # RabbitMQ; credentials come from here (or DINET_AMQP_URL in the CLI)
    namespace: str = DEFAULT_NAMESPACE  # which deployment's queues to use
    agent_id: str = field(default_factory=new_agent_id)  # names the durable reply queue; reuse it to
    #   pick up results that arrived while this agent was disconnected
    default_priority: str = DEFAULT_PRIORITY  # "high" | "normal" | "batch"
    reply_prefetch: int = 256  # reply messages (chunks, results) in flight to this agent at once
    publish_timeout_s: float = 30.0  # a request not confirmed by RabbitMQ by then counts as a failed try
    publish_attempts: int = 4  # tries per request on transport errors only (connection lost, timeout)
    retry_backoff_s: float = 0.5  # first wait between tries; doubles each time, at most 5 s
    result_timeout_s: float | None = None  # default wait for a result; None = until the deadline (plus
    #   deadline_grace_s) when there is one, else forever
    deadline_grace_s: float = 10.0  # past a request's deadline, wait this long for its typed error
    remembered_requests: int = 10_000  # finished request ids kept to recognise late duplicates
    report_outcomes: bool = True  # after each request, publish what this agent saw (node, ok or error, its own
    #   timings) to the telemetry stream: brokers judge nodes' reputation on these, never on nodes' own reports
    outcome_flush_s: float = 1.0  # on close, wait at most this long for outcome reports still in flight
    initial_peers: tuple[str, ...] = ()  # DHT multiaddrs to join, to confirm that each result's signer owns the
    #   node id it names (agent/owners.py); empty = no DHT: results are accepted with signer_confirmed=None
    owner_cache_s: float = 10.0  # how long a view of node owners read from the DHT is reused
    owner_lookup_timeout_s: float = 2.0  # longest a result waits for the DHT; slower = accepted unconfirmed
    delete_reply_queue_on_close: bool = False  # for one-shot clients (the CLI without --agent-id): nothing
    #   can pick up later results anyway, so do not leave the queue to expire a day later

    def __post_init__(self) -> None:
        validate_name("namespace", self.namespace)
        validate_name("agent id", self.agent_id)
        if self.default_priority not in PRIORITIES:
            raise ValueError(f"unknown priority {self.default_priority!r}; choose one of {', '.join(PRIORITIES)}")
        if self.publish_attempts < 1:
            raise ValueError("publish_attempts must be >= 1")
        self.initial_peers = check_initial_peers(self.initial_peers)
        for name in ("owner_cache_s", "owner_lookup_timeout_s"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number of seconds > 0, got {value!r}")
