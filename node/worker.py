"""The node's task worker: consumes its consumer group's queue and hands each task to be answered.

One task, start to end::

    RoutedTask (group queue, manual ack)
      -> parse (malformed: typed error to the sender if its reply_to is known, then dead-letter)
      -> already answered? (ledger or telemetry: ack, compute nothing)
      -> node.task_answer: validate, generate, stream, reply, record, settle, report

This module is the AMQP side of the node: declaring, consuming, deduplicating, draining.
What happens to one task once taken is :mod:`node.task_answer`. :meth:`TaskWorker.drain`
stops taking tasks, lets the running ones finish within a grace period and requeues the
rest. The connection is a robust one: after a RabbitMQ restart aio-pika reopens the
channels, redeclares the queues and resumes consuming; tasks that were in flight are
redelivered and the ledger keeps them from being computed twice.

The reputation fence (:mod:`node.fence`) pauses consuming while the brokers' reputation
ledger, rebuilt here from the telemetry stream, says this node is below the threshold, and
resumes when it recovers. Pausing is not draining: tasks in hand run on and are settled
as usual, and nothing is nacked because of the fence.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue, AbstractRobustConnection
from google.protobuf.message import DecodeError

from node.dedup import CompletedLedger
from node.engine import Engine
from node.fence import ReputationFence, ReputationWatch
from node.replies import TRANSPORT_ERRORS, ConnectionLost, Delivery
from node.task_answer import TaskAnswerer
from node.task_outcomes import TaskOutcomes
from node.telemetry import TelemetryTail
from node.worker_config import WorkerConfig, WorkerStats
from proto import messages_pb2
from proto.result_signing import ResultSigner
from proto.topology import Topology

__all__ = ["TaskWorker", "WorkerConfig", "WorkerStats"]

logger = logging.getLogger(__name__)


class TaskWorker:
    """Consumes ``<namespace>.group.<group>`` and answers every task with an engine.

    :param engine: computes tokens (:class:`node.local_engine.LocalEngine`, the sharded chain engine or
        :class:`node.engines.vllm_engine.VllmEngine`); its ``methods`` say which methods it runs.
    :param tokenizer: a ``transformers`` tokenizer of the served model.
    :param ledger: persistent record of answered requests; ``None`` keeps it in memory only.
    :param signer: signs every final result; ``None``: hivemind's process-wide key, which is the key that
        signs this process's DHT records (a node without a DHT should pass a key kept in its state directory).
    """

    def __init__(
        self, config: WorkerConfig, *, engine: Engine, tokenizer: Any, ledger: CompletedLedger | None = None,
        signer: ResultSigner | None = None,
    ) -> None:
        self.config = config
        self.topology = Topology(config.namespace)
        self.stats = WorkerStats()
        self._ledger = ledger
        self._answered_here: set[str] = set()  # when running without a ledger
        self._telemetry: TelemetryTail | None = None
        self._task_channel: AbstractChannel | None = None
        self._publish_channel: AbstractChannel | None = None
        self._queue: AbstractQueue | None = None
        self._consumer_tag: str | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._draining = False
        self._consumer_lock = asyncio.Lock()  # the fence and drain both start/cancel the consumer
        self._watch: ReputationWatch | None = None
        self._fence: ReputationFence | None = None
        self._fence_task: asyncio.Task[None] | None = None
        self._signer = signer or ResultSigner.process_wide()
        outcomes = TaskOutcomes(config, topology=self.topology, stats=self.stats,
                                remember_answered=self._remember_answered, signer=self._signer)
        self._answerer = TaskAnswerer(outcomes, engine=engine, tokenizer=tokenizer)

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self, connection: AbstractRobustConnection) -> None:
        """Declare what the worker uses, replay telemetry (dedup, reputation), then consume unless fenced."""
        cfg = self.config
        self._publish_channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        await self.topology.declare_dead_letters(self._publish_channel)
        await self.topology.telemetry_spec().declare(self._publish_channel)
        self._answerer.attach(self._publish_channel)
        if cfg.telemetry_lookback_s > 0:
            self._telemetry = TelemetryTail(self.topology, lookback_s=cfg.telemetry_lookback_s)
            await self._telemetry.start(connection)
            await self._telemetry.wait_caught_up()
        self._task_channel = await connection.channel()
        await self._task_channel.set_qos(prefetch_count=cfg.prefetch)
        self._queue = await self.topology.group_queue_spec(cfg.group).declare(self._task_channel)
        if cfg.fence:
            await self._start_fence(connection)
        if self._fence is None or not self._fence.fenced:
            await self._resume_consuming()
            logger.info(
                "node %s consuming %s (model %s, prefetch %d)",
                cfg.node_id, self._queue.name, cfg.limits.model_name, cfg.prefetch,
            )

    async def _start_fence(self, connection: AbstractRobustConnection) -> None:
        """Rebuild the brokers' reputation table, judge this node once, then keep re-checking."""
        cfg = self.config
        own_key = self._signer.public_key  # only answers signed with it are this node's (an impostor's are not)
        self._watch = ReputationWatch(self.topology, cfg.reputation,
                                      owner_key=lambda node_id: own_key if node_id == cfg.node_id else None)
        await self._watch.start(connection, catch_up_s=cfg.fence_catch_up_s)
        self._fence = ReputationFence(
            cfg.node_id, self._watch.ledger, threshold=cfg.reputation.threshold,
            pause=self._pause_consuming, resume=self._resume_consuming, interval_s=cfg.fence_check_s,
        )
        await self._fence.check()  # fenced from the start when the replay says so: no task taken first
        self._fence_task = asyncio.create_task(self._fence.run(), name=f"fence-{cfg.node_id}")

    @property
    def fenced(self) -> bool:
        """The reputation fence holds this node off its group queue right now."""
        return self._fence is not None and self._fence.fenced

    async def _pause_consuming(self) -> None:
        """Cancel the group queue consumer (the fence); tasks already delivered still run."""
        async with self._consumer_lock:
            await self._cancel_consumer()

    async def _resume_consuming(self) -> None:
        """Consume the group queue (at start, and when the fence lifts); never while draining.

        :raises aio_pika.exceptions.AMQPError: or another transport error; the fence retries later.
        """
        async with self._consumer_lock:
            if self._draining or self._consumer_tag is not None or self._queue is None:
                return
            self._consumer_tag = await self._queue.consume(self._on_message)

    async def _cancel_consumer(self) -> None:
        if self._queue is not None and self._consumer_tag is not None:
            tag, self._consumer_tag = self._consumer_tag, None
            try:
                await self._queue.cancel(tag)
            except TRANSPORT_ERRORS as exc:  # the connection is gone: the broker dropped the consumer anyway
                logger.warning("could not cancel the consumer cleanly: %s", exc)

    async def stop_consuming(self) -> None:
        """Take no new tasks (those already delivered to this node still run)."""
        self._draining = True
        if self._fence is not None:
            self._fence.state.stop()
        async with self._consumer_lock:
            await self._cancel_consumer()

    async def drain(self, grace_s: float | None = None) -> None:
        """Stop consuming, wait up to ``grace_s`` for running tasks, requeue those still running."""
        grace = self.config.drain_grace_s if grace_s is None else grace_s
        await self.stop_consuming()
        running = set(self._tasks)
        if running:
            logger.info("draining: waiting up to %.1f s for %d task(s)", grace, len(running))
            _, pending = await asyncio.wait(running, timeout=grace)
            if pending:
                logger.warning("draining: %d task(s) did not finish in time; requeueing them", len(pending))
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)

    async def close(self) -> None:
        """Drain (if not done yet) and close the worker's channels."""
        await self.drain()
        if self._fence_task is not None:
            self._fence_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._fence_task
            self._fence_task = None
        if self._watch is not None:
            await self._watch.close()
        if self._telemetry is not None:
            await self._telemetry.close()
        for channel in (self._task_channel, self._publish_channel):
            if channel is not None and not channel.is_closed:
                with contextlib.suppress(*TRANSPORT_ERRORS):
                    await channel.close()
        self._task_channel = self._publish_channel = None
        self._answerer.attach(None)

    @property
    def busy(self) -> int:
        """Tasks this node holds right now."""
        return len(self._tasks)

    # -- one task ----------------------------------------------------------------------------
    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        delivery = Delivery(message)
        if self._draining:  # delivered between our cancel and the broker's cancel-ok
            await delivery.settle("nack")
            return
        task = asyncio.create_task(self._process(delivery))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _already_answered(self, request_id: str) -> bool:
        if self._ledger is not None and request_id in self._ledger:
            return True
        if request_id in self._answered_here:
            return True
        return self._telemetry is not None and request_id in self._telemetry.answered

    def _remember_answered(self, request_id: str) -> None:
        if self._ledger is not None:
            self._ledger.add(request_id)
        else:
            self._answered_here.add(request_id)

    async def _process(self, d: Delivery) -> None:
        arrived = time.time()
        try:
            routed = messages_pb2.RoutedTask.FromString(d.message.body)
        except DecodeError:
            await self._answerer.reject_malformed(d)
            return
        rid = routed.request.request_id
        earlier = self._inflight.get(rid)
        if earlier is not None:  # redelivered while we still compute it (after a reconnect)
            logger.info("task %s redelivered while in flight here; waiting for the first copy", rid)
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.shield(earlier)
        if rid and self._already_answered(rid):
            self.stats.deduplicated += 1
            logger.info("task %s was already answered; acking it without computing", rid)
            await d.settle("ack")
            return
        this = asyncio.current_task()
        if rid and this is not None:
            self._inflight[rid] = this  # type: ignore[assignment]
        try:
            concurrency = max(0, len(self._inflight) - 1)  # other tasks in flight here
            await self._answerer.answer(d, routed, arrived=arrived, concurrency=concurrency)
        except asyncio.CancelledError:  # drain timed out
            if d.finishing is not None:  # the result is out already: let the ack go through
                with contextlib.suppress(Exception):
                    await asyncio.shield(d.finishing)
            elif not d.settled:
                self.stats.requeued += 1
                logger.warning("task %s requeued (node shutting down)", rid)
                await asyncio.shield(d.settle("nack"))
            raise
        except ConnectionLost as exc:
            logger.warning("task %s: %s; RabbitMQ will redeliver it", rid, exc)
        finally:
            if rid and self._inflight.get(rid) is this:
                del self._inflight[rid]
