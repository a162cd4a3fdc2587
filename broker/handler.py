"""One delivery's path through the broker: gate, validate, route, publish (confirmed), settle.

The per-request state machine, apart from the process's life cycle (:mod:`broker.service` builds,
connects, declares, starts and stops the parts used here): this alone decides what happens to a
message, so this is what to check against the at-least-once promise.

Per delivery, one of:

- routed: a RoutingRecord (the decision, for reputation) appended to the telemetry
  stream, then the RoutedTask published (confirm + mandatory), then the request is acked;
- refused (bad input, unknown model, past deadline, over budget): a typed error goes
  to ``reply_to`` and the request is rejected without requeue -> dead-letter queue;
- crashed (an unexpected exception): rejected *with* requeue, until the delivery
  that the quorum queue's delivery limit makes the last one, which is refused with a
  typed ``DELIVERY_LIMIT`` error instead (a poison message cannot loop or block);
- transport trouble (connection lost): nothing is settled; RabbitMQ redelivers.

Priorities: one consumer (own channel, own prefetch) per priority queue, and a
:class:`WeightedFairGate` over the routing slots, so ``high`` wins under load and
``batch`` is never starved. Publishes are pipelined: up to ``max_in_flight``
confirms are outstanding at once, and each request is acked when its own confirm lands.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable

import aio_pika
from aio_pika.abc import AbstractChannel

from broker.amqp import REFUSED_ERRORS, TRANSPORT_ERRORS, publish, send_error
from broker.batching import RouteBatcher
from broker.config import BrokerConfig
from broker.consumer import Delivery
from broker.fairness import WeightedFairGate
from broker.route_records import RouteRecorder
from broker.routing import Router
from broker.settle import Settler
from broker.stats import BrokerStats
from broker.validation import parse_request, reply_target, validate_request
from proto import messages_pb2
from proto.errors import DeliveryLimitError, DinetError
from proto.topology import DELIVERY_LIMIT, Topology

logger = logging.getLogger(__name__)


class Outcome(enum.Enum):
    """How a delivery is settled once the broker is done with it."""

    ACK = "ack"  # routed and confirmed
    DEAD_LETTER = "dead-letter"  # refused with a typed error sent to the sender
    REQUEUE = "requeue"  # try again (crash before the last attempt, transport trouble, nack)
    STALE = "stale"  # its channel is gone: RabbitMQ redelivers it by itself


class RequestHandler:
    """Handles every delivery of one broker; :meth:`attach` it to the router and channel before deliveries start."""

    def __init__(
        self, config: BrokerConfig, topology: Topology, *, stats: BrokerStats, gate: WeightedFairGate,
        settler: Settler, routes: RouteRecorder, clock: Callable[[], float],
    ) -> None:
        self.config = config
        self.topology = topology
        self.stats = stats
        self.gate = gate
        self.settler = settler
        self.clock = clock
        self.router: Router | None = None
        self._batcher: RouteBatcher | None = None  # set for policies that score windows in one batch
        self._publish_channel: AbstractChannel | None = None
        self._group_queues: dict[str, str] = {}  # group -> queue name (validated once)
        self._declared_groups: dict[str, asyncio.Future[aio_pika.abc.AbstractQueue]] = {}
        self._pending = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._routes = routes

    def attach(self, router: Router, batcher: RouteBatcher | None, publish_channel: AbstractChannel) -> None:
        """Route with ``router`` (through ``batcher`` when set) and publish on ``publish_channel``."""
        self.router = router
        self._batcher = batcher
        self._publish_channel = publish_channel

    def forget_groups(self) -> None:
        """Declare every group queue again before its next publish (after a reconnect)."""
        self._declared_groups.clear()

    async def wait_idle(self) -> None:
        """Return once no delivery is in hand."""
        await self._idle.wait()

    async def on_request(self, delivery: Delivery) -> None:
        """Gate, handle and settle one delivery (the priority consumers' callback)."""
        priority = delivery.priority
        self._pending += 1
        self._idle.clear()
        outcome = Outcome.REQUEUE  # if anything below fails unexpectedly, another attempt is made
        try:
            await self.gate.acquire(priority)
            try:
                outcome = await self._handle(priority, delivery)
            finally:
                self.gate.release()
        except Exception:  # never let a delivery task die silently or leave its message unsettled
            logger.exception("unhandled error on a %s request", priority)
        finally:
            await self._settle(priority, delivery, outcome)
            self._pending -= 1
            if self._pending == 0:
                self._idle.set()

    async def _settle(self, priority: str, delivery: Delivery, outcome: Outcome) -> None:
        if outcome is Outcome.ACK:
            if self.settler.ack(delivery):
                self.stats.routed[priority] += 1
        elif outcome is Outcome.DEAD_LETTER:
            await self.settler.reject(delivery, requeue=False)
        elif outcome is Outcome.REQUEUE:
            self.stats.requeued += 1
            await self.settler.reject(delivery, requeue=True)

    async def _handle(self, priority: str, delivery: Delivery) -> Outcome:
        """Everything but the settlement: validate, route, publish (confirmed) or answer with an error."""
        if delivery.stale:
            return Outcome.STALE
        router, channel = self._ready()
        started = time.perf_counter()
        now = self.clock()
        self.stats.consumed[priority] += 1
        request: messages_pb2.InferenceRequest | None = None
        try:
            request = parse_request(delivery.body, self.config.limits)
            validate_request(request, self.config.limits, self.topology, now=now)
            if self._batcher is not None:
                decision = await self._batcher.route(request, now=now, concurrency=self._pending)
            else:
                decision = router.route(request, now=now, concurrency=self._pending)
            body = messages_pb2.RoutedTask(request=request, decision=decision).SerializeToString()
            record = messages_pb2.RoutingRecord(
                request_id=request.request_id, agent_id=request.agent_id, model=request.model, decision=decision
            )
        except DinetError as error:
            return await self._refuse(delivery, request, error)
        except Exception:
            return await self._crashed(delivery, request)
        self.stats.sched_ms.append((time.perf_counter() - started) * 1000.0)
        self.stats.select_ms.append(decision.sched_ms)

        group = decision.group
        expiration = request.deadline_unix - now if request.deadline_unix else None
        try:
            await self._ensure_group(group)
            if self.config.record_routes:
                await self._record_route(request.request_id, record)
            await publish(
                channel,
                body,
                self._group_queue(group),
                message_id=request.request_id,
                type_="RoutedTask",
                expiration_s=max(expiration, 0.001) if expiration is not None else None,
                timeout_s=self.config.publish_timeout_s,
            )
        except REFUSED_ERRORS as exc:
            self._declared_groups.pop(group, None)  # maybe the group queue is gone: redeclare next time
            logger.warning("RabbitMQ refused routing %s to %s (%s); requeued", request.request_id, group, exc)
            return Outcome.REQUEUE
        except TRANSPORT_ERRORS as exc:
            logger.info("routing %s interrupted (%s); it will be delivered again", request.request_id, exc)
            return Outcome.REQUEUE
        self.stats.by_group[group] = self.stats.by_group.get(group, 0) + 1
        return Outcome.ACK

    async def _record_route(self, request_id: str, record: messages_pb2.RoutingRecord) -> None:
        """Append the decision to the telemetry stream, confirmed, *before* the task exists.

        Reputation judges the node against this record (broker/reputation.py); publishing it first
        means a node learns a request id only after the genuine record is on the stream. The records
        of one loop turn travel as one entry (broker/route_records.py). A refused record is logged and
        the request still goes out (it is then judged on nothing); transport errors propagate and
        requeue the request like a failed task publish.
        """
        try:
            await self._routes.record(record)
        except REFUSED_ERRORS as exc:
            self.stats.unrecorded += 1
            logger.warning("routing record of %s refused by RabbitMQ (%s); it will not be judged", request_id, exc)

    def _ready(self) -> tuple[Router, AbstractChannel]:
        if self.router is None or self._publish_channel is None:
            raise RuntimeError("request delivered before the broker finished starting")
        return self.router, self._publish_channel

    def _group_queue(self, group: str) -> str:
        name = self._group_queues.get(group)
        if name is None:
            name = self._group_queues[group] = self.topology.group_queue(group)
        return name

    async def _ensure_group(self, group: str) -> None:
        task = self._declared_groups.get(group)
        if task is None:
            _, channel = self._ready()
            task = asyncio.ensure_future(self.topology.group_queue_spec(group).declare(channel))
            self._declared_groups[group] = task
        try:
            await asyncio.shield(task)
        except BaseException:
            self._declared_groups.pop(group, None)
            raise

    def _reply_to(self, delivery: Delivery, request: messages_pb2.InferenceRequest | None) -> str | None:
        return reply_target(self.topology, request.reply_to if request else None, delivery.reply_to)

    @staticmethod
    def _request_id(delivery: Delivery, request: messages_pb2.InferenceRequest | None) -> str:
        if request is not None and request.request_id:
            return request.request_id
        return delivery.message_id or delivery.correlation_id or ""

    async def _refuse(
        self, delivery: Delivery, request: messages_pb2.InferenceRequest | None, error: DinetError
    ) -> Outcome:
        """Typed error to the sender (when reachable), then dead-letter the request."""
        _, channel = self._ready()
        request_id = self._request_id(delivery, request)
        try:
            await send_error(channel, self._reply_to(delivery, request), request_id, error,
                             broker_id=self.config.broker_id)
        except TRANSPORT_ERRORS:
            return Outcome.REQUEUE  # answered again on the next delivery (the agent drops duplicates)
        self.stats.refused[error.code_name] = self.stats.refused.get(error.code_name, 0) + 1
        logger.info("refused %s: %s: %s", request_id or "<no id>", error.code_name, error)
        return Outcome.DEAD_LETTER

    async def _crashed(
        self, delivery: Delivery, request: messages_pb2.InferenceRequest | None
    ) -> Outcome:
        attempt = delivery.delivery_count
        request_id = self._request_id(delivery, request)
        logger.exception("processing %s crashed (delivery %d of %d)", request_id or "<no id>", attempt + 1,
                         DELIVERY_LIMIT + 1)
        self.stats.crashed += 1
        if attempt < DELIVERY_LIMIT:
            return Outcome.REQUEUE
        return await self._refuse(delivery, request, DeliveryLimitError(
            f"request {request_id} crashed the broker on all {attempt + 1} deliveries; it was moved to "
            f"{self.topology.dead_letter_queue}. Report it with its request_id"))
