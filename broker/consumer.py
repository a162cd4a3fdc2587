"""Consuming the priority request queues, one channel (and prefetch window) per priority.

Deliveries are taken straight from aiormq (no aio-pika message object and no extra
task per delivery: that halves the per-request CPU of consuming). The aio-pika robust
channels underneath still reconnect by themselves; :meth:`PriorityConsumers.ensure`
(called on every reconnect and by a watchdog every second) starts consuming again on
whatever channel is current, so consuming resumes after a RabbitMQ restart or after a
channel was reopened, without operator action.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from aio_pika.abc import AbstractChannel, AbstractRobustConnection
from aiormq.abc import AbstractChannel as RawChannel
from aiormq.abc import DeliveredMessage

from broker.amqp import TRANSPORT_ERRORS
from proto.topology import PRIORITIES, Topology

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class Delivery:
    """One request as delivered on one channel."""

    priority: str
    channel: RawChannel
    tag: int
    body: bytes
    reply_to: str
    message_id: str
    correlation_id: str
    headers: dict[str, Any]

    @classmethod
    def from_aiormq(cls, priority: str, message: DeliveredMessage) -> Delivery:
        props = message.header.properties
        return cls(
            priority=priority,
            channel=message.channel,
            tag=message.delivery_tag or 0,
            body=message.body,
            reply_to=props.reply_to or "",
            message_id=props.message_id or "",
            correlation_id=props.correlation_id or "",
            headers=props.headers or {},
        )

    @property
    def stale(self) -> bool:
        """Its channel is gone: RabbitMQ redelivers it, nothing must be done with it."""
        return bool(self.channel.is_closed)

    @property
    def delivery_count(self) -> int:
        """Earlier deliveries of this message (quorum queues count every return)."""
        value = self.headers.get("x-delivery-count", 0)
        return value if isinstance(value, int) else 0


class PriorityConsumers:
    """A consumer per priority queue, kept alive across reconnects."""

    def __init__(
        self,
        topology: Topology,
        prefetch: dict[str, int],
        on_delivery: Callable[[Delivery], Awaitable[None]],
    ) -> None:
        self.topology = topology
        self.prefetch = prefetch
        self.on_delivery = on_delivery
        self._channels: dict[str, AbstractChannel] = {}
        self._consuming: dict[str, tuple[RawChannel, str]] = {}
        self._watchdog: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    async def start(self, connection: AbstractRobustConnection) -> None:
        for priority in PRIORITIES:
            channel = await connection.channel()
            await self.topology.request_queue_spec(priority).declare(channel)
            self._channels[priority] = channel
        await self.ensure()
        self._watchdog = asyncio.create_task(self._watch(), name="request-consumers-watchdog")

    async def ensure(self) -> None:
        """Consume on the current channel of every priority (no-op where already consuming)."""
        async with self._lock:
            for priority, channel in self._channels.items():
                raw = await channel.get_underlay_channel()
                current = self._consuming.get(priority)
                if current is not None and current[0] is raw and not raw.is_closed:
                    continue
                await raw.basic_qos(prefetch_count=self.prefetch[priority])
                ok = await raw.basic_consume(
                    self.topology.request_queue(priority), partial(self._deliver, priority)
                )
                self._consuming[priority] = (raw, str(ok.consumer_tag))
                if current is not None:
                    logger.warning("consuming %s requests again after the channel was lost", priority)

    async def _deliver(self, priority: str, message: DeliveredMessage) -> None:
        await self.on_delivery(Delivery.from_aiormq(priority, message))

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                await asyncio.wait_for(self.ensure(), timeout=10)
            except TRANSPORT_ERRORS as exc:
                logger.debug("consumer watchdog: RabbitMQ not ready yet (%s)", exc)

    async def cancel(self) -> None:
        """Stop taking new deliveries (those in hand are still settled normally)."""
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
            self._watchdog = None
        async with self._lock:
            for raw, tag in self._consuming.values():
                with contextlib.suppress(*TRANSPORT_ERRORS):
                    await raw.basic_cancel(tag)
            self._consuming.clear()
