"""The worker's AMQP edge: publishing replies to an agent and settling a delivered task.

Kept apart from :mod:`node.worker` so the worker reads as the task's story, and the
rules that every publish is confirmed and mandatory, that replies only ever go to this
namespace's reply queues, and that a task is settled exactly once, live in one place.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from dataclasses import dataclass

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from aio_pika.exceptions import CONNECTION_EXCEPTIONS, DeliveryError

from proto import errors, messages_pb2
from proto.topology import Topology

logger = logging.getLogger(__name__)

TRANSPORT_ERRORS = (*CONNECTION_EXCEPTIONS, TimeoutError)


class ConnectionLost(Exception):
    """A publish could not reach RabbitMQ; the unacked task will be redelivered."""


@dataclass(eq=False)
class Delivery:
    """One delivered task message and whether it has been acked, requeued or dead-lettered yet."""

    message: AbstractIncomingMessage
    settled: bool = False
    finishing: asyncio.Task[None] | None = None  # the shielded publish-result-then-ack step, once started

    async def settle(self, how: str) -> None:
        """``ack`` / ``nack`` (requeue) / ``reject`` (dead-letter), once. If the channel died,
        RabbitMQ requeues the task by itself, so a failure here is only logged."""
        if self.settled:
            return
        self.settled = True
        try:
            if how == "ack":
                await self.message.ack()
            elif how == "nack":
                await self.message.nack(requeue=True)
            else:
                await self.message.reject(requeue=False)
        except TRANSPORT_ERRORS as exc:
            logger.warning("could not %s task %r (%s); RabbitMQ will redeliver it", how,
                           self.message.correlation_id or self.message.delivery_tag, exc)

    @property
    def delivery_count(self) -> int:
        """Earlier deliveries of this message (quorum queues count them in ``x-delivery-count``)."""
        raw = (self.message.headers or {}).get("x-delivery-count", 0)
        return raw if isinstance(raw, int) and raw >= 0 else 0


def reply_to_ok(topology: Topology, reply_to: str) -> bool:
    """Replies go only to this namespace's reply queues, never to a task or request queue."""
    prefix = f"{topology.namespace}.reply."
    return reply_to.startswith(prefix) and len(reply_to) > len(prefix)


def error_result(
    request_id: str, exc: errors.DinetError, *, node_id: str, group: str, method: str = ""
) -> messages_pb2.InferenceResult:
    return messages_pb2.InferenceResult(
        request_id=request_id,
        ok=False,
        error=exc.to_proto(),
        node_id=node_id,
        group=group,
        method=method,
        finish_reason="error",
    )


async def publish_reply(
    channel: AbstractChannel | None,
    *,
    request_id: str,
    reply_to: str,
    body: bytes,
    kind: str,
    node_id: str,
    timeout_s: float,
) -> None:
    """Confirmed, mandatory, persistent publish of a reply (``kind`` = its AMQP ``type``).

    :raises DeliveryError: the reply queue does not exist (or RabbitMQ refused the message).
    :raises ConnectionLost: any transport failure.
    """
    if channel is None:
        raise ConnectionLost("the worker is closed")
    message = aio_pika.Message(
        body,
        type=kind,
        correlation_id=request_id,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        timestamp=dt.datetime.now(dt.UTC),
        app_id=node_id,
    )
    try:
        await channel.default_exchange.publish(message, routing_key=reply_to, mandatory=True, timeout=timeout_s)
    except DeliveryError:
        raise
    except TRANSPORT_ERRORS as exc:
        raise ConnectionLost(f"publishing a {kind} failed: {exc!r}") from exc
