"""The broker process: consume requests, validate, route, publish with confirms, ack.

At-least-once, nothing lost: a request is acked only after its RoutedTask publish to
the group queue is confirmed by RabbitMQ. A broker killed at any instant leaves its
unacked requests to be redelivered to another broker; the worst case is a request
routed twice, which the node (dedup by request_id) and the agent (drops duplicate
results) absorb.

This module is the process's life cycle: it builds the parts (policy, directory, router,
reputation ledger, telemetry consumer, gate, settler), connects to RabbitMQ, declares the
topology, starts the consumers, redeclares after a reconnect and drains on stop. What happens
to each delivery (routed, refused, crashed, requeued) is :mod:`broker.handler`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractRobustConnection

from broker.amqp import TRANSPORT_ERRORS, close_quietly, publish
from broker.batching import RouteBatcher
from broker.config import BrokerConfig
from broker.consumer import PriorityConsumers
from broker.deadletters import DeadLetterWatcher
from broker.directory import DhtNodeReader, GroupDirectory
from broker.fairness import WeightedFairGate
from broker.handler import RequestHandler
from broker.policies import TelemetrySink, load_policy
from broker.priority import use_realtime_priority
from broker.reputation import ReputationLedger
from broker.route_records import RouteRecorder
from broker.routing import Router
from broker.settle import Settler
from broker.stats import BrokerStats
from broker.telemetry import TelemetryConsumer
from proto.telemetry import ROUTING_RECORD_BATCH
from proto.topology import Topology
from scheduler.interface import SchedulingPolicy

logger = logging.getLogger(__name__)


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
        self._routes = RouteRecorder(self._publish_routes, broker_id=config.broker_id)
        self._handler = RequestHandler(config, self.topology, stats=self.stats, gate=self.gate,
                                       settler=self.settler, routes=self._routes, clock=clock)
        self.consumers = PriorityConsumers(self.topology, config.prefetch, self._handler.on_request)

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
        self._handler.attach(self.router, self._batcher, self._publish_channel)
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
            await asyncio.wait_for(self._handler.wait_idle(), timeout=drain_s)
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
        self._handler.forget_groups()
        self.stats.reconnects += 1
        logger.warning("reconnected to RabbitMQ; redeclaring the topology")
        if self._publish_channel is not None:
            try:
                await self.topology.declare_core(self._publish_channel)
                await self.consumers.ensure()
            except TRANSPORT_ERRORS as exc:
                logger.warning("redeclaring the topology failed (%s); the watchdog retries", exc)

    async def _publish_routes(self, body: bytes, message_id: str) -> None:
        if self._publish_channel is None:
            raise RuntimeError("routing records published before the broker started")
        await publish(self._publish_channel, body, self.topology.telemetry_stream, message_id=message_id,
                      type_=ROUTING_RECORD_BATCH, timeout_s=self.config.publish_timeout_s)
