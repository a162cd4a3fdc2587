"""Small AMQP helpers shared by the broker's consumers: confirmed publishes, safe acks, error replies."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import cast

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from aiormq.exceptions import AMQPError, ChannelInvalidStateError, DeliveryError
from pamqp.commands import Basic

from proto import messages_pb2
from proto.errors import DinetError

logger = logging.getLogger(__name__)

PERSISTENT = 2
CONTENT_TYPE = "application/x-protobuf"

# Failures of the transport (connection or channel lost, confirm timed out): the request
# was not acked, so RabbitMQ redelivers it; there is nothing else to do.
TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (
    AMQPError, ConnectionError, ChannelInvalidStateError, asyncio.TimeoutError,
)
# The broker refused the publish (nack) or could not route it (mandatory return).
REFUSED_ERRORS: tuple[type[BaseException], ...] = (DeliveryError,)


async def safe_ack(message: AbstractIncomingMessage) -> bool:
    try:
        await message.ack()
    except TRANSPORT_ERRORS as exc:
        logger.debug("ack of %s lost with its channel (%s); RabbitMQ will redeliver", message.message_id, exc)
        return False
    return True


async def publish(
    channel: AbstractChannel,
    body: bytes,
    routing_key: str,
    *,
    message_id: str = "",
    type_: str = "",
    expiration_s: float | None = None,
    timeout_s: float = 30.0,
) -> None:
    """Publish to a queue (default exchange), persistently, mandatory, and return once RabbitMQ confirmed it.

    :raises DeliveryError: nacked or unroutable. :raises TRANSPORT_ERRORS: connection trouble.
    """
    # Straight to aiormq with pamqp properties: aio_pika.Message costs more CPU than the rest
    # of routing together, and the broker publishes once per request.
    properties = Basic.Properties(
        delivery_mode=PERSISTENT,
        content_type=CONTENT_TYPE,
        message_id=message_id or None,
        message_type=type_ or None,
        expiration=str(max(1, int(expiration_s * 1000))) if expiration_s is not None else None,
    )
    underlay = cast(aiormq.Channel, await channel.get_underlay_channel())  # the concrete class has `wait`
    # wait=False: do not wait for the socket write to drain (the writer then batches frames
    # into fewer syscalls); the confirm awaited below is what proves RabbitMQ has the message.
    await underlay.basic_publish(
        body, exchange="", routing_key=routing_key, properties=properties, mandatory=True, timeout=timeout_s,
        wait=False,
    )


def error_result(request_id: str, error: DinetError, *, broker_id: str) -> messages_pb2.InferenceResult:
    return messages_pb2.InferenceResult(
        request_id=request_id,
        ok=False,
        error=error.to_proto(),
        node_id=f"broker:{broker_id}",
        finish_reason="error",
    )


async def send_error(
    channel: AbstractChannel, reply_to: str | None, request_id: str, error: DinetError, *, broker_id: str
) -> bool:
    """Publish a typed error result to ``reply_to``.

    :returns: False when the reply queue does not exist (nobody can hear it).
    :raises TRANSPORT_ERRORS: connection trouble (the caller must not settle the request).
    """
    if not reply_to:
        return False
    body = error_result(request_id, error, broker_id=broker_id).SerializeToString()
    try:
        await publish(channel, body, reply_to, message_id=request_id, type_="InferenceResult")
    except REFUSED_ERRORS as exc:
        logger.warning("could not deliver %s for %s to %s: %s", error.code_name, request_id, reply_to, exc)
        return False
    return True


async def close_quietly(closable: aio_pika.abc.AbstractConnection | None) -> None:
    if closable is not None:
        with contextlib.suppress(Exception):
            await closable.close()
