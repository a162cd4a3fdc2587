"""How one task is answered, once the worker has taken it: the task's story from validation to report.

    validate, check the deadline (typed error, then dead-letter)
      -> tokenize, generate; TokenChunks stream to reply_to as tokens come
      -> final InferenceResult (publisher confirm, mandatory)
      -> record as answered -> settle -> TimingReport to the telemetry stream

:class:`TaskAnswerer` knows nothing about consuming, dedup or draining (that is
:mod:`node.worker`); it only turns one delivered :class:`~proto.messages_pb2.RoutedTask` into
replies and a settlement. A failure of the engine requeues the task; on its last delivery the
agent gets a typed ``NODE_FAILURE`` instead. Once a result is out, the publish -> record -> ack
step is shielded from cancellation, so a shutdown never turns an answered task into a requeue.
Every final result, ok or error, is signed just before it is published with the node's DHT
record key (:mod:`proto.result_signing`): one signature per request; chunks are not signed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aio_pika.abc import AbstractChannel
from aio_pika.exceptions import DeliveryError

from node.engine import Engine, GenerationRequest
from node.replies import ConnectionLost, Delivery, error_result, publish_reply, reply_to_ok
from node.streaming import RESULT_TYPE, ChunkStream, IncrementalDetokenizer
from node.telemetry import build_report, publish_report, shared_prefix_ratio
from node.validation import validate_prompt_tokens, validate_request
from node.worker_config import WorkerConfig, WorkerStats
from proto import errors, messages_pb2
from proto.common_pb2 import ErrorCode
from proto.methods import DEFAULT_METHOD
from proto.result_signing import ResultSigner
from proto.topology import DELIVERY_LIMIT, Topology

logger = logging.getLogger(__name__)


def choose_method(requested: str, served: tuple[str, ...]) -> str:
    """The method this node runs for a request whose routing decision asked for ``requested``.

    The requested one when the engine runs it; otherwise the engine's default: ``baseline``
    when it runs it, else the method it was built for (a vLLM engine's options are fixed, so a
    node built for ``prefix_caching`` runs every request that way). The result and the timing
    report name the method that actually ran.
    """
    if requested in served:
        return requested
    if DEFAULT_METHOD in served or not served:
        return DEFAULT_METHOD
    return served[0]


@dataclass(eq=False)
class _Context:
    """What the steps of one task share."""

    routed: messages_pb2.RoutedTask
    arrived: float  # unix time the task reached this node
    concurrency: int  # other tasks in flight here when it arrived
    prompt_ids: tuple[int, ...] = ()
    chunks: int = 0  # TokenChunk messages sent


class TaskAnswerer:
    """Answers single tasks with an engine; the worker owns one and hands it each task it takes.

    :param remember_answered: records a request id as answered (the worker's ledger), called
        after the final result is confirmed and before the task is acked.
    :param signer: signs every final result with the node's DHT record key.
    """

    def __init__(
        self,
        config: WorkerConfig,
        *,
        topology: Topology,
        stats: WorkerStats,
        engine: Engine,
        tokenizer: Any,
        remember_answered: Callable[[str], None],
        signer: ResultSigner,
    ) -> None:
        self.config = config
        self._signer = signer
        self.topology = topology
        self.stats = stats
        self._engine = engine
        self._tokenizer = tokenizer
        self._remember_answered = remember_answered
        self._publish_channel: AbstractChannel | None = None
        self._recent_prompts: deque[tuple[int, ...]] = deque(maxlen=64)
        self._engine_methods: tuple[str, ...] = tuple(getattr(engine, "methods", (DEFAULT_METHOD,)))

    def attach(self, publish_channel: AbstractChannel | None) -> None:
        """Publish replies and reports on this channel (publisher confirms on); ``None`` detaches."""
        self._publish_channel = publish_channel

    async def answer(self, d: Delivery, routed: messages_pb2.RoutedTask, *, arrived: float, concurrency: int) -> None:
        """Validate, compute, reply, settle and report one task.

        :raises ConnectionLost: the connection went away; nothing was settled, RabbitMQ redelivers.
        :raises asyncio.CancelledError: the worker is draining; the caller requeues unless settled.
        """
        await self._answer(d, routed, arrived, concurrency)

    async def reject_malformed(self, d: Delivery) -> None:
        """Dead-letter a task that is not a RoutedTask; tell its sender if the AMQP properties name one."""
        await self._reject_malformed(d)

    async def _answer(
        self, d: Delivery, routed: messages_pb2.RoutedTask, arrived: float, concurrency: int
    ) -> None:
        request = routed.request
        ctx = _Context(routed=routed, arrived=arrived, concurrency=concurrency)
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
        method = choose_method(decision.method, self._engine_methods)
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
            await self._publish_result(request.reply_to, result)
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
                await self._publish_result(reply_to, result)
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

    async def _publish_result(self, reply_to: str, result: messages_pb2.InferenceResult) -> None:
        """Sign (last: nothing may change a signed field after this) and publish a final result."""
        body = self._signer.sign(result).SerializeToString()
        await self._publish_reply(result.request_id, reply_to, body, RESULT_TYPE)

    async def _publish_reply(self, request_id: str, reply_to: str, body: bytes, kind: str) -> None:
        await publish_reply(self._publish_channel, request_id=request_id, reply_to=reply_to, body=body, kind=kind,
                            node_id=self.config.node_id, timeout_s=self.config.publish_timeout_s)
