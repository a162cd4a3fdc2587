"""Publishing one request to RabbitMQ: confirmed, mandatory, retried on transport errors only.

A request is published to ``<namespace>.requests.<priority>`` with a publisher confirm
and ``mandatory=True``, so when :func:`publish_request` returns the request is in
RabbitMQ, and when it raises the user is told what to do: a refused request
(no such queue) is not retried and points at ``dinet-broker init``; a lost connection
or a confirm timeout is retried a bounded number of times with backoff
(:func:`retry_delay`), then gives up with a ``ConnectionError``.

Kept apart from :mod:`agent.client` so the retry policy is one small, named thing
that can be read (and tested) without the connection and reply handling around it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Callable

import aio_pika
from aio_pika.abc import AbstractChannel
from aio_pika.exceptions import CONNECTION_EXCEPTIONS, DeliveryError

from agent.config import AgentConfig
from proto import messages_pb2

logger = logging.getLogger(__name__)

REQUEST_TYPE = messages_pb2.InferenceRequest.DESCRIPTOR.name
TRANSPORT_ERRORS = (*CONNECTION_EXCEPTIONS, TimeoutError)


def retry_delay(attempt: int, base_s: float, max_s: float = 5.0) -> float:
    """Backoff before try ``attempt`` (2, 3, ...): base, 2*base, 4*base, ... at most ``max_s``."""
    return float(min(base_s * 2 ** (attempt - 2), max_s))


def request_message(request: messages_pb2.InferenceRequest, *, app_id: str) -> aio_pika.Message:
    """The persistent AMQP message that carries ``request`` (ids double as message and correlation ids)."""
    return aio_pika.Message(
        request.SerializeToString(),
        type=REQUEST_TYPE,
        message_id=request.request_id,
        correlation_id=request.request_id,
        reply_to=request.reply_to,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        timestamp=dt.datetime.now(dt.UTC),
        content_type="application/x-protobuf",
        app_id=app_id,
    )


async def publish_request(
    channel_of: Callable[[], AbstractChannel | None],
    request: messages_pb2.InferenceRequest,
    routing_key: str,
    config: AgentConfig,
) -> None:
    """Publish with a confirm; retries transport errors only, with backoff, then gives up.

    ``channel_of`` is asked for the publish channel before every try: None means the agent was closed.
    """
    message = request_message(request, app_id=config.agent_id)
    attempts = config.publish_attempts
    for attempt in range(1, attempts + 1):
        if attempt > 1:
            await asyncio.sleep(retry_delay(attempt, config.retry_backoff_s))
        channel = channel_of()
        if channel is None:
            raise RuntimeError("the agent is closed")
        try:
            await channel.default_exchange.publish(
                message, routing_key=routing_key, mandatory=True, timeout=config.publish_timeout_s
            )
            return
        except DeliveryError as exc:
            raise ConnectionError(
                f"RabbitMQ refused request {request.request_id} on {routing_key} ({exc}); "
                "run `dinet-broker init` to declare the queues"
            ) from exc
        except TRANSPORT_ERRORS as exc:
            if attempt == attempts:
                raise ConnectionError(
                    f"could not publish request {request.request_id} after {attempts} tries ({exc!r}); "
                    "is RabbitMQ reachable?"
                ) from exc
            logger.warning("publishing %s failed (%r); retrying", request.request_id, exc)
