"""Tells the sender when RabbitMQ dead-letters a request on its own.

The broker answers every request it refuses itself. Two cases reach the dead-letter
exchange without any dinet process having answered: a message that crashed its
consumer process every time until the quorum queue's delivery limit dead-lettered it
(reason ``delivery_limit``, from a request queue or a group queue), and a routed task
whose deadline TTL expired in a group queue (reason ``expired``). A copy of every
dead letter goes to ``<namespace>.dead.watch`` (the originals stay in
``<namespace>.dead`` for the operator); brokers compete on it and send the sender a
typed ``DELIVERY_LIMIT`` or ``DEADLINE_EXCEEDED`` error.
"""

from __future__ import annotations

import logging
from typing import Any

from aio_pika import ExchangeType
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from google.protobuf.message import DecodeError

from broker.amqp import TRANSPORT_ERRORS, safe_ack, send_error
from broker.validation import reply_target
from proto import messages_pb2
from proto.errors import DeadlineExceededError, DeliveryLimitError, DinetError
from proto.topology import QueueSpec, Topology

logger = logging.getLogger(__name__)

WATCH_MAX_LENGTH = 100_000


def watch_queue_spec(topology: Topology) -> QueueSpec:
    return QueueSpec(
        f"{topology.dead_letter_queue}.watch",
        delivery_limit=None,
        extra={"x-max-length": WATCH_MAX_LENGTH, "x-overflow": "drop-head"},
    )


def _header(headers: dict[str, Any], key: str) -> str:
    value = headers.get(key, "")
    return value.decode() if isinstance(value, bytes) else str(value)


class DeadLetterWatcher:
    def __init__(self, topology: Topology, publish_channel: AbstractChannel, *, broker_id: str) -> None:
        self.topology = topology
        self.publish_channel = publish_channel
        self.broker_id = broker_id
        self.notified = 0

    async def start(self, channel: AbstractChannel) -> None:
        await channel.set_qos(prefetch_count=32)
        exchange = await channel.declare_exchange(
            self.topology.dead_letter_exchange, ExchangeType.FANOUT, durable=True
        )
        queue = await watch_queue_spec(self.topology).declare(channel)
        await queue.bind(exchange, routing_key="#")
        await queue.consume(self._on_message)

    def classify(
        self, headers: dict[str, Any], body: bytes
    ) -> tuple[messages_pb2.InferenceRequest, DinetError] | None:
        """(request, error to send) for a dead letter nobody answered yet, else None."""
        reason = _header(headers, "x-first-death-reason")
        source = _header(headers, "x-first-death-queue")
        if reason not in ("delivery_limit", "expired"):
            return None  # "rejected": the process that rejected it has answered
        ns = self.topology.namespace
        try:
            if source.startswith(f"{ns}.group."):
                request = messages_pb2.RoutedTask.FromString(body).request
            elif source.startswith(f"{ns}.requests."):
                request = messages_pb2.InferenceRequest.FromString(body)
            else:
                return None
        except (DecodeError, ValueError):
            return None
        if reason == "expired":
            error: DinetError = DeadlineExceededError(
                f"request {request.request_id} waited in {source} past its deadline and was not computed; "
                "resubmit with a later deadline or a higher priority"
            )
        else:
            error = DeliveryLimitError(
                f"request {request.request_id} crashed its consumer on every delivery and was moved to "
                f"{self.topology.dead_letter_queue} after the delivery limit; report it with its request_id"
            )
        return request, error

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        found = self.classify(dict(message.headers or {}), message.body)
        if found is not None:
            request, error = found
            reply = reply_target(self.topology, request.reply_to, message.reply_to)
            try:
                if await send_error(self.publish_channel, reply, request.request_id, error, broker_id=self.broker_id):
                    self.notified += 1
                    logger.warning("sent %s for dead-lettered request %s", error.code_name, request.request_id)
            except TRANSPORT_ERRORS:
                return  # not acked: redelivered after the reconnect
        await safe_ack(message)
