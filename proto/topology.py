"""RabbitMQ topology: queue names and their declaration from value objects.

Every role declares what it uses at start-up, idempotently and with identical
arguments, so any process can come up first and a RabbitMQ restart is healed by
redeclaring. All names live under a namespace (``dinet`` by default), which lets
tests and parallel deployments share one RabbitMQ without touching each other's
queues. dinet code never deletes a queue outside a namespace it created itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractQueue

PRIORITIES: tuple[str, ...] = ("high", "normal", "batch")
DEFAULT_PRIORITY = "normal"
DEFAULT_NAMESPACE = "dinet"
DELIVERY_LIMIT = 5  # redeliveries before a message is dead-lettered as poison
REPLY_QUEUE_EXPIRES_MS = 24 * 3600 * 1000  # an agent gone for a day loses its reply queue
TELEMETRY_MAX_BYTES = 2 * 1024**3

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$")


def validate_name(kind: str, name: str) -> str:
    """Group names, agent ids and namespaces become queue names: keep them to a safe alphabet."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(
            f"invalid {kind} {name!r}: use 1-100 characters from letters, digits, '_', '.', '-'"
        )
    return name


@dataclass(frozen=True)
class QueueSpec:
    """A queue as RabbitMQ must see it. Every queue is durable, by construction."""

    name: str
    kind: str = "quorum"  # "quorum" | "stream" | "classic"
    dead_letter_exchange: str | None = None
    delivery_limit: int | None = DELIVERY_LIMIT
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in ("quorum", "stream", "classic"):
            raise ValueError(f"unknown queue kind {self.kind!r}")
        if self.kind == "stream" and (self.dead_letter_exchange or self.delivery_limit):
            raise ValueError("streams support neither dead-lettering nor delivery limits")

    def arguments(self) -> dict[str, Any]:
        args: dict[str, Any] = {"x-queue-type": self.kind}
        if self.dead_letter_exchange:
            args["x-dead-letter-exchange"] = self.dead_letter_exchange
        if self.delivery_limit is not None:
            args["x-delivery-limit"] = self.delivery_limit
        args.update(self.extra)
        return args

    async def declare(self, channel: AbstractChannel) -> AbstractQueue:
        return await channel.declare_queue(self.name, durable=True, arguments=self.arguments())


@dataclass(frozen=True)
class Topology:
    """All queue names of one dinet deployment (namespace)."""

    namespace: str = DEFAULT_NAMESPACE

    def __post_init__(self) -> None:
        validate_name("namespace", self.namespace)

    @property
    def dead_letter_exchange(self) -> str:
        return f"{self.namespace}.dlx"

    @property
    def dead_letter_queue(self) -> str:
        return f"{self.namespace}.dead"

    @property
    def telemetry_stream(self) -> str:
        return f"{self.namespace}.telemetry"

    def request_queue(self, priority: str) -> str:
        if priority not in PRIORITIES:
            raise ValueError(f"unknown priority {priority!r}; choose one of {', '.join(PRIORITIES)}")
        return f"{self.namespace}.requests.{priority}"

    def group_queue(self, group: str) -> str:
        return f"{self.namespace}.group.{validate_name('group name', group)}"

    def reply_queue(self, agent_id: str) -> str:
        return f"{self.namespace}.reply.{validate_name('agent id', agent_id)}"

    # -- specs ---------------------------------------------------------------------------
    def request_queue_spec(self, priority: str) -> QueueSpec:
        return QueueSpec(self.request_queue(priority), dead_letter_exchange=self.dead_letter_exchange)

    def group_queue_spec(self, group: str) -> QueueSpec:
        return QueueSpec(self.group_queue(group), dead_letter_exchange=self.dead_letter_exchange)

    def reply_queue_spec(self, agent_id: str) -> QueueSpec:
        return QueueSpec(
            self.reply_queue(agent_id),
            delivery_limit=None,
            extra={"x-expires": REPLY_QUEUE_EXPIRES_MS},
        )

    def telemetry_spec(self) -> QueueSpec:
        return QueueSpec(
            self.telemetry_stream,
            kind="stream",
            delivery_limit=None,
            extra={"x-max-length-bytes": TELEMETRY_MAX_BYTES},
        )

    def dead_letter_spec(self) -> QueueSpec:
        return QueueSpec(self.dead_letter_queue, delivery_limit=None)

    # -- declaration ---------------------------------------------------------------------
    async def declare_dead_letters(self, channel: AbstractChannel) -> AbstractQueue:
        exchange = await channel.declare_exchange(
            self.dead_letter_exchange, aio_pika.ExchangeType.FANOUT, durable=True
        )
        queue = await self.dead_letter_spec().declare(channel)
        await queue.bind(exchange, routing_key="#")
        return queue

    async def declare_core(self, channel: AbstractChannel, groups: tuple[str, ...] = ()) -> None:
        """Dead letters, one request queue per priority, the telemetry stream, and the given groups."""
        await self.declare_dead_letters(channel)
        for priority in PRIORITIES:
            await self.request_queue_spec(priority).declare(channel)
        await self.telemetry_spec().declare(channel)
        for group in groups:
            await self.group_queue_spec(group).declare(channel)
