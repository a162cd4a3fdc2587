"""The node's task worker: consumes its consumer group's queue and answers each task.

One task, start to end::

    RoutedTask (group queue, manual ack)
      -> parse (malformed: typed error to the sender if its reply_to is known, then dead-letter)
      -> already answered? (ledger or telemetry: ack, compute nothing)
      -> validate, check the deadline (typed error, then dead-letter)
      -> tokenize, generate; TokenChunks stream to reply_to as tokens come
      -> final InferenceResult (publisher confirm, mandatory)
      -> record in the ledger -> ack -> TimingReport to the telemetry stream

A failure of the engine requeues the task (another node, or this one later, retries it);
on its last delivery the agent gets a typed ``NODE_FAILURE`` instead. :meth:`TaskWorker.drain`
stops taking tasks, lets the running ones finish within a grace period and requeues the
rest. The connection is a robust one: after a RabbitMQ restart aio-pika reopens the
channels, redeclares the queues and resumes consuming; tasks that were in flight are
redelivered and the ledger keeps them from being computed twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue, AbstractRobustConnection
from aio_pika.exceptions import DeliveryError
from google.protobuf.message import DecodeError

from node.dedup import CompletedLedger
from node.engine import Engine, GenerationRequest
from node.replies import TRANSPORT_ERRORS, ConnectionLost, Delivery, error_result, publish_reply, reply_to_ok
from node.streaming import RESULT_TYPE, ChunkStream, IncrementalDetokenizer
from node.telemetry import TelemetryTail, build_report, publish_report, shared_prefix_ratio
from node.validation import Limits, validate_prompt_tokens, validate_request
from proto import errors, messages_pb2
from proto.common_pb2 import ErrorCode
from proto.methods import DEFAULT_METHOD
from proto.records import HardwareInfo
from proto.topology import DEFAULT_NAMESPACE, DELIVERY_LIMIT, Topology

logger = logging.getLogger(__name__)


@dataclass
class WorkerConfig:
    """Knobs of one task worker."""

    node_id: str  # stable identity of this node (reports, chunks, reputation)
    group: str  # consumer group whose queue this node consumes
    limits: Limits  # model served and the sizes accepted
    namespace: str = DEFAULT_NAMESPACE  # RabbitMQ namespace (queue name prefix)
    prefetch: int = 4  # tasks taken at once from the group queue, and computed concurrently
    chunk_max_tokens: int = 32  # most tokens in one TokenChunk
    drain_grace_s: float = 30.0  # on shutdown, how long running tasks may take before they are requeued
    telemetry_lookback_s: float = 24 * 3600.0  # how far back to replay telemetry for dedup; 0 = do not
    publish_timeout_s: float = 30.0  # a publish not confirmed by then counts as a transport failure
    hardware: HardwareInfo = field(default_factory=HardwareInfo)  # measured profile, sent in reports


@dataclass
class WorkerStats:
    """Counters since start (also handy in tests)."""

    completed: int = 0  # answered with tokens
    failed: int = 0  # answered with a typed error
    deduplicated: int = 0  # skipped: already answered
    requeued: int = 0  # handed back to the queue (engine failure, shutdown)
    dead_lettered: int = 0  # rejected to the dead-letter queue


@dataclass(eq=False)
class _Context:
    """What the steps of one task share."""

    routed: messages_pb2.RoutedTask
    arrived: float  # unix time the task reached this node
    concurrency: int  # other tasks in flight here when it arrived
    prompt_ids: tuple[int, ...] = ()
    chunks: int = 0  # TokenChunk messages sent


class TaskWorker:
    """Consumes ``<namespace>.group.<group>`` and answers every task with an engine.

    :param engine: computes tokens (:class:`node.local_engine.LocalEngine` or the sharded engine).
    :param tokenizer: a ``transformers`` tokenizer of the served model.
    :param ledger: persistent record of answered requests; ``None`` keeps it in memory only.
    """

    def __init__(
        self, config: WorkerConfig, *, engine: Engine, tokenizer: Any, ledger: CompletedLedger | None = None
    ) -> None:
        self.config = config
        self.topology = Topology(config.namespace)
        self.stats = WorkerStats()
        self._engine = engine
        self._tokenizer = tokenizer
        self._ledger = ledger
        self._answered_here: set[str] = set()  # when running without a ledger
        self._telemetry: TelemetryTail | None = None
        self._task_channel: AbstractChannel | None = None
        self._publish_channel: AbstractChannel | None = None
        self._queue: AbstractQueue | None = None
        self._consumer_tag: str | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._recent_prompts: deque[tuple[int, ...]] = deque(maxlen=64)
        self._draining = False
        self._engine_methods: tuple[str, ...] = tuple(getattr(engine, "methods", (DEFAULT_METHOD,)))

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self, connection: AbstractRobustConnection) -> None:
        """Declare what the worker uses, replay recent telemetry, then start consuming."""
        cfg = self.config
        self._publish_channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        await self.topology.declare_dead_letters(self._publish_channel)
        await self.topology.telemetry_spec().declare(self._publish_channel)
        if cfg.telemetry_lookback_s > 0:
            self._telemetry = TelemetryTail(self.topology, lookback_s=cfg.telemetry_lookback_s)
            await self._telemetry.start(connection)
            await self._telemetry.wait_caught_up()
        self._task_channel = await connection.channel()
        await self._task_channel.set_qos(prefetch_count=cfg.prefetch)
        self._queue = await self.topology.group_queue_spec(cfg.group).declare(self._task_channel)
        self._consumer_tag = await self._queue.consume(self._on_message)
        logger.info(
            "node %s consuming %s (model %s, prefetch %d)",
            cfg.node_id, self._queue.name, cfg.limits.model_name, cfg.prefetch,
        )

    async def stop_consuming(self) -> None:
        """Take no new tasks (those already delivered to this node still run)."""
        self._draining = True
        if self._queue is not None and self._consumer_tag is not None:
            tag, self._consumer_tag = self._consumer_tag, None
            try:
                await self._queue.cancel(tag)
            except TRANSPORT_ERRORS as exc:  # the connection is gone: the broker dropped the consumer anyway
                logger.warning("could not cancel the consumer cleanly: %s", exc)

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
        if self._telemetry is not None:
            await self._telemetry.close()
        for channel in (self._task_channel, self._publish_channel):
            if channel is not None and not channel.is_closed:
                with contextlib.suppress(*TRANSPORT_ERRORS):
                    await channel.close()
        self._task_channel = self._publish_channel = None

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
            await self._reject_malformed(d)
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
            await self._answer(d, routed, arrived)
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

    async def _answer(self, d: Delivery, routed: messages_pb2.RoutedTask, arrived: float) -> None:
        request = routed.request
        ctx = _Context(routed=routed, arrived=arrived, concurrency=max(0, len(self._inflight) - 1))
        if not reply_to_ok(self.topology, request.reply_to):
            logger.warning("task %r has no usable reply_to %r; dead-lettering it", request.request_id, request.reply_to)
            self.stats.dead_lettered += 1
            await d.settle("reject")
            return
        try:
            validate_request(request, self.config.limits)
            if request.deadline_unix and time.time() > request.deadline_unix:
                late = time.time() - request.deadline_unix
                raise errors.DeadlineExceededError(
                    f"the request's deadline passed {late:.2f} s before a node could start it; "
                    "allow a longer deadline (--deadline-s) or retry when the network is less busy"
                )
            ctx.prompt_ids = tuple(await asyncio.to_thread(self._tokenizer.encode, request.prompt))
            validate_prompt_tokens(len(ctx.prompt_ids), request.max_new_tokens, self.config.limits)
        except errors.DinetError as exc:
            await self._fail(d, ctx, exc)
            return
        await self._generate_and_reply(d, ctx)

    async def _generate_and_reply(self, d: Delivery, ctx: _Context) -> None:
        request, decision = ctx.routed.request, ctx.routed.decision
        method = decision.method if decision.method in self._engine_methods else DEFAULT_METHOD
        if decision.method and decision.method != method:
            logger.info("task %s: method %r is not available here; running %r", request.request_id,
                        decision.method, method)
        gen = GenerationRequest(
            prompt_ids=ctx.prompt_ids,
            max_new_tokens=request.max_new_tokens,
            temperature=request.sampling.temperature,
            top_p=request.sampling.top_p or 1.0,
            seed=self._seed_for(request),
            method=method,
            eos_token_id=self._tokenizer.eos_token_id,
            request_id=request.request_id,
        )
        stream = ChunkStream(
            request_id=request.request_id,
            node_id=self.config.node_id,
            detokenizer=IncrementalDetokenizer(self._tokenizer),
            publish=lambda body, kind: self._publish_reply(request.request_id, request.reply_to, body, kind),
            max_tokens=self.config.chunk_max_tokens,
        )
        started = time.time()
        t0 = time.perf_counter()
        first_at: float | None = None
        tokens: list[int] = []
        late: errors.DinetError | None = None
        try:
            async with contextlib.aclosing(self._engine.generate(gen)) as token_iter:  # type: ignore[type-var]
                async for token in token_iter:
                    if first_at is None:
                        first_at = time.perf_counter()
                    tokens.append(token)
                    stream.push(token)
                    if request.deadline_unix and time.time() > request.deadline_unix:
                        late = errors.DeadlineExceededError(
                            f"the request's deadline passed after {len(tokens)} of {request.max_new_tokens} "
                            "tokens; allow a longer deadline or ask for fewer tokens"
                        )
                        break
            await stream.finish()
        except asyncio.CancelledError:
            await stream.abort()
            raise
        except ConnectionLost:
            await stream.abort()
            raise
        except DeliveryError as exc:
            await stream.abort()
            await self._reply_queue_gone(d, request, exc)
            return
        except errors.DinetError as exc:  # a typed verdict of the engine (no route, retries exhausted, ...)
            await stream.abort()
            await self._fail(d, ctx, exc)
            return
        except Exception as exc:
            await stream.abort()
            await self._engine_failed(d, ctx, exc)
            return
        if late is not None:
            await self._fail(d, ctx, late)
            return
        end = time.perf_counter()
        decode_from = first_at if first_at is not None else t0
        timing = messages_pb2.Timing(
            prompt_tokens=len(ctx.prompt_ids),
            new_tokens=len(tokens),
            ttft_s=decode_from - t0,
            total_s=end - t0,
            tokens_per_s=(len(tokens) - 1) / (end - decode_from) if len(tokens) > 1 and end > decode_from else 0.0,
            queue_s=max(0.0, started - request.submitted_at) if request.submitted_at else 0.0,
        )
        eos = bool(tokens) and tokens[-1] == gen.eos_token_id
        result = messages_pb2.InferenceResult(
            request_id=request.request_id,
            ok=True,
            token_ids=tokens,
            text=self._tokenizer.decode(tokens, skip_special_tokens=True),
            timing=timing,
            node_id=self.config.node_id,
            group=self.config.group,
            method=method,
            finish_reason="eos" if eos else "length",
        )
        ctx.chunks = stream.chunks_sent
        await self._finish(d, ctx, result, settle="ack")

    def _seed_for(self, request: messages_pb2.InferenceRequest) -> int | None:
        """The agent's seed, or one derived from the request id: a retried request samples the same tokens."""
        if request.sampling.temperature <= 0:
            return None
        if request.sampling.has_seed:
            return int(request.sampling.seed)
        return int.from_bytes(hashlib.sha256(request.request_id.encode()).digest()[:8], "big")

    # -- outcomes ----------------------------------------------------------------------------
    async def _finish(self, d: Delivery, ctx: _Context, result: messages_pb2.InferenceResult, *, settle: str) -> None:
        """Publish the final result, remember it, settle the task, then report it.

        Once started this step is shielded from cancellation: a result that went out is
        always followed by its ack, so a shutdown never turns it into a requeue.
        """
        d.finishing = asyncio.create_task(self._finish_unshielded(d, ctx, result, settle))
        await asyncio.shield(d.finishing)

    async def _finish_unshielded(
        self, d: Delivery, ctx: _Context, result: messages_pb2.InferenceResult, settle: str
    ) -> None:
        request = ctx.routed.request
        try:
            await self._publish_reply(request.request_id, request.reply_to, result.SerializeToString(), RESULT_TYPE)
        except DeliveryError as exc:
            await self._reply_queue_gone(d, request, exc)
            return
        self._remember_answered(request.request_id)
        await d.settle(settle)
        if result.ok:
            self.stats.completed += 1
            logger.info(
                "task %s done: %d tokens in %.3f s (ttft %.3f s, %.1f tok/s, %d chunks)",
                request.request_id, result.timing.new_tokens, result.timing.total_s, result.timing.ttft_s,
                result.timing.tokens_per_s, ctx.chunks,
            )
        else:
            self.stats.failed += 1
            logger.info("task %s answered with %s: %s", request.request_id,
                        ErrorCode.Name(result.error.code), result.error.message)
        await self._report(ctx, result)

    async def _report(self, ctx: _Context, result: messages_pb2.InferenceResult) -> None:
        """One row of the meta-training set / reputation ledger (best effort: the agent has its answer)."""
        shared = shared_prefix_ratio(ctx.prompt_ids, list(self._recent_prompts))
        if ctx.prompt_ids:
            self._recent_prompts.append(ctx.prompt_ids)
        report = build_report(routed=ctx.routed, result=result, hardware=self.config.hardware,
                              shared_prefix=shared, concurrency=ctx.concurrency)
        if self._publish_channel is None:
            return
        try:
            await publish_report(self._publish_channel, self.topology, report)
        except Exception as exc:
            logger.warning("could not publish the timing report of %s: %s", result.request_id, exc)

    async def _fail(self, d: Delivery, ctx: _Context, exc: errors.DinetError) -> None:
        """Answer with a typed error and dead-letter the task."""
        request = ctx.routed.request
        result = self._error_result(request.request_id, exc, ctx.routed.decision.method)
        result.timing.prompt_tokens = len(ctx.prompt_ids)
        result.timing.queue_s = max(0.0, ctx.arrived - request.submitted_at) if request.submitted_at else 0.0
        self.stats.dead_lettered += 1
        await self._finish(d, ctx, result, settle="reject")

    async def _engine_failed(self, d: Delivery, ctx: _Context, exc: BaseException) -> None:
        """Requeue for another try, or on the last allowed delivery answer ``NODE_FAILURE``."""
        request = ctx.routed.request
        deliveries = d.delivery_count
        logger.error("task %s: engine failed (delivery %d): %r", request.request_id, deliveries + 1, exc,
                     exc_info=exc)
        if deliveries + 1 < DELIVERY_LIMIT:
            self.stats.requeued += 1
            await d.settle("nack")
            return
        failure = errors.NodeFailureError(
            f"the node failed while computing this request on each of {deliveries + 1} tries ({exc!r}); "
            "it may be too large for the nodes serving this model, or a node is broken"
        )
        await self._fail(d, ctx, failure)

    async def _reject_malformed(self, d: Delivery) -> None:
        """Dead-letter a task that is not a RoutedTask; tell its sender if the AMQP properties name one."""
        reply_to = d.message.reply_to or ""
        rid = d.message.correlation_id or d.message.message_id or ""
        logger.warning("malformed task (%d bytes, correlation_id %r); dead-lettering it", len(d.message.body), rid)
        if rid and reply_to_ok(self.topology, reply_to):
            exc = errors.MalformedMessageError(
                "the task for this request could not be parsed as a RoutedTask and was dead-lettered; "
                "resubmit it, and report a bug if it happens again"
            )
            result = self._error_result(rid, exc)
            try:
                await self._publish_reply(rid, reply_to, result.SerializeToString(), RESULT_TYPE)
            except (DeliveryError, ConnectionLost) as err:
                logger.warning("could not tell %s that its task was malformed: %s", reply_to, err)
            else:
                self.stats.failed += 1
        self.stats.dead_lettered += 1
        await d.settle("reject")

    async def _reply_queue_gone(self, d: Delivery, request: messages_pb2.InferenceRequest, exc: Exception) -> None:
        logger.warning("task %s: reply queue %r does not exist (%s); dead-lettering the task",
                       request.request_id, request.reply_to, exc)
        self.stats.dead_lettered += 1
        await d.settle("reject")

    def _error_result(self, request_id: str, exc: errors.DinetError, method: str = "") -> messages_pb2.InferenceResult:
        return error_result(request_id, exc, node_id=self.config.node_id, group=self.config.group, method=method)

    async def _publish_reply(self, request_id: str, reply_to: str, body: bytes, kind: str) -> None:
        await publish_reply(self._publish_channel, request_id=request_id, reply_to=reply_to, body=body, kind=kind,
                            node_id=self.config.node_id, timeout_s=self.config.publish_timeout_s)
