"""The broker process: consume requests, validate, route, publish with confirms, ack.

At-least-once, nothing lost: a request is acked only after its RoutedTask publish to
the group queue is confirmed by RabbitMQ. A broker killed at any instant leaves its
unacked requests to be redelivered to another broker; the worst case is a request
routed twice, which the node (dedup by request_id) and the agent (drops duplicate
results) absorb.

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
import contextlib
import enum
import logging
import time
from collections.abc import Callable, Sequence

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractRobustConnection

from broker.amqp import (
    REFUSED_ERRORS,
    TRANSPORT_ERRORS,
    close_quietly,
    publish,
    send_error,
)
from broker.batching import RouteBatcher
from broker.config import BrokerConfig
from broker.consumer import Delivery, PriorityConsumers
from broker.deadletters import DeadLetterWatcher
from broker.directory import DhtNodeReader, GroupDirectory
from broker.fairness import WeightedFairGate
from broker.policies import TelemetrySink, load_policy
from broker.priority import use_realtime_priority
from broker.reputation import ReputationLedger
from broker.route_records import RouteRecorder
from broker.routing import Router
from broker.settle import Settler
from broker.stats import BrokerStats
from broker.telemetry import TelemetryConsumer
from broker.validation import parse_request, reply_target, validate_request
from proto import messages_pb2
from proto.errors import DeliveryLimitError, DinetError
from proto.telemetry import ROUTING_RECORD_BATCH
from proto.topology import DELIVERY_LIMIT, Topology
from scheduler.interface import SchedulingPolicy

logger = logging.getLogger(__name__)


class Outcome(enum.Enum):
    """How a delivery is settled once the broker is done with it."""

    ACK = "ack"  # routed and confirmed
    DEAD_LETTER = "dead-letter"  # refused with a typed error sent to the sender
    REQUEUE = "requeue"  # try again (crash before the last attempt, transport trouble, nack)
    STALE = "stale"  # its channel is gone: RabbitMQ redelivers it by itself


class BrokerService:
    """One broker process. ``await start()``, then ``await stop()`` (or ``async with``)."""

    def __init__(
        self,
        config: BrokerConfig,
        *,
        policy: SchedulingPolicy | None = None,
        directory: GroupDirectory | None = None,
        sinks: Sequence[TelemetrySink] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.topology = Topology(config.namespace)
        self.policy = policy if policy is not None else load_policy(config.scheduler, config.scheduler_model or None)
        self.ledger = ReputationLedger(config.reputation, owner_key=self._owner_key)
        self._directory = directory
        self.clock = clock
        sink_list = list(sinks)
        if isinstance(self.policy, TelemetrySink) and self.policy not in sink_list:
            sink_list.append(self.policy)  # an online-learning policy sees the outcomes of its decisions
        self.telemetry = TelemetryConsumer(self.topology, self.ledger, sink_list, prefetch=config.telemetry_prefetch)
        self.stats = BrokerStats()
        self.gate = WeightedFairGate(config.max_in_flight, config.weights)
        self.settler = Settler()
        self.router: Router | None = None
        self._batcher: RouteBatcher | None = None  # set at start for policies that score windows in one batch
        self.connection: AbstractRobustConnection | None = None
        self._publish_channel: AbstractChannel | None = None
        self.consumers = PriorityConsumers(self.topology, config.prefetch, self._on_request)
        self._group_queues: dict[str, str] = {}  # group -> queue name (validated once)
        self._declared_groups: dict[str, asyncio.Future[aio_pika.abc.AbstractQueue]] = {}
        self._pending = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._routes = RouteRecorder(self._publish_routes, broker_id=config.broker_id)

    @property
    def directory(self) -> GroupDirectory:
        if self._directory is None:
            raise RuntimeError("the broker is not started")
        return self._directory

    def _owner_key(self, node_id: str) -> bytes | None:
        """Who owns ``node_id``'s DHT record (the only key that may sign results as that node), if known."""
        return self._directory.owner_key(node_id) if self._directory is not None else None

    # -- life cycle ----------------------------------------------------------------------
    async def start(self) -> None:
        cfg = self.config
        use_realtime_priority(cfg.realtime_priority)  # this is the loop's thread; what starts below is not raised
        if self._directory is None:
            reader = None
            if cfg.use_dht:
                reader = await asyncio.to_thread(DhtNodeReader, cfg.initial_peers, start_swarm=cfg.dht)
            self._directory = GroupDirectory(
                cfg.static_groups, reader=reader, ttl_s=cfg.directory_ttl_s, group_methods=cfg.group_methods
            )
        await self._directory.start()
        self.router = Router(self.policy, self._directory, self.ledger, broker_id=cfg.broker_id)
        if cfg.batch_routing and getattr(self.policy, "batches", False):
            self._batcher = RouteBatcher(self.router)

        self.connection = await aio_pika.connect_robust(
            cfg.amqp_url,
            reconnect_interval=cfg.reconnect_interval_s,
            client_properties={"connection_name": f"dinet-broker {cfg.broker_id}"},
        )
        self.connection.reconnect_callbacks.add(self._on_reconnect)
        self._publish_channel = await self.connection.channel(publisher_confirms=True, on_return_raises=True)
        await self.topology.declare_core(self._publish_channel)

        await self.telemetry.start(await self.connection.channel())
        caught_up = await self.telemetry.wait_caught_up()
        logger.info("reputation table rebuilt from %d telemetry reports (%s)", self.telemetry.received,
                    "caught up" if caught_up else "still replaying")
        if cfg.watch_dead_letters:
            watcher = DeadLetterWatcher(self.topology, self._publish_channel,
                                        broker_id=cfg.broker_id)
            await watcher.start(await self.connection.channel())
        await self.consumers.start(self.connection)
        logger.info(
            "broker %s routing with scheduler %s (%s) on namespace %r; groups: %s",
            cfg.broker_id, self.policy.name, type(self.policy).__name__, cfg.namespace,
            ", ".join(f"{g.group}={'/'.join(sorted(g.models))}" for g in self.directory.all_groups()) or "none yet",
        )

    async def stop(self, *, drain_s: float = 10.0) -> None:
        """Stop consuming, let requests in hand finish (up to ``drain_s``), and close."""
        await self.consumers.cancel()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout=drain_s)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.settler.drain(), timeout=drain_s)
        await self._routes.close()
        await close_quietly(self.connection)
        self.connection = None
        if self._directory is not None:
            await self._directory.close()
        close_policy = getattr(self.policy, "close", None)
        if callable(close_policy):  # an online learner stops its retraining thread and child process
            await asyncio.to_thread(close_policy)

    async def __aenter__(self) -> BrokerService:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _on_reconnect(self, *_: object) -> None:
        """aio-pika has reopened the channels: redeclare the topology and consume the request queues again."""
        self._declared_groups.clear()
        self.stats.reconnects += 1
        logger.warning("reconnected to RabbitMQ; redeclaring the topology")
        if self._publish_channel is not None:
            try:
                await self.topology.declare_core(self._publish_channel)
                await self.consumers.ensure()
            except TRANSPORT_ERRORS as exc:
                logger.warning("redeclaring the topology failed (%s); the watchdog retries", exc)

    # -- per request ---------------------------------------------------------------------
    async def _on_request(self, delivery: Delivery) -> None:
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

    async def _publish_routes(self, body: bytes, message_id: str) -> None:
        if self._publish_channel is None:
            raise RuntimeError("routing records published before the broker started")
        await publish(self._publish_channel, body, self.topology.telemetry_stream, message_id=message_id,
                      type_=ROUTING_RECORD_BATCH, timeout_s=self.config.publish_timeout_s)

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
