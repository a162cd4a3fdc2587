"""The node's connection to RabbitMQ: robust, and patient with a server that is still starting.

A node is often started together with its RabbitMQ (scripts/setup.sh, a container set), so
the first connect is retried with backoff for ``timeout_s`` before the node gives up with an
error that says what to do; after that aio-pika's robust connection reconnects by itself.
"""

from __future__ import annotations

import asyncio
import logging
import time

import aio_pika
from aio_pika.abc import AbstractRobustConnection

logger = logging.getLogger(__name__)


async def connect(url: str, *, timeout_s: float) -> AbstractRobustConnection:
    """A robust connection (it reconnects by itself later); the first connect is retried with backoff.

    :raises ConnectionError: RabbitMQ stayed unreachable for ``timeout_s`` (the message hides credentials).
    """
    deadline = time.monotonic() + timeout_s
    delay = 0.5
    while True:
        try:
            return await aio_pika.connect_robust(url, timeout=10)
        except (ConnectionError, OSError, aio_pika.exceptions.AMQPConnectionError) as exc:
            if time.monotonic() + delay > deadline:
                raise ConnectionError(
                    f"cannot reach RabbitMQ at {redact(url)} ({exc}); start it (scripts/setup.sh does) "
                    "or pass --amqp-url / DINET_AMQP_URL"
                ) from exc
            logger.warning("RabbitMQ not reachable yet (%s); retrying in %.1f s", exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


def redact(url: str) -> str:
    """``url`` with its credentials replaced by ``***``, fit for logs and error messages."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.split('@', 1)[1]}"
