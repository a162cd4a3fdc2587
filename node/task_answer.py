"""How one task is answered, once the worker has taken it: the task's story from validation to report.

    validate, check the deadline (typed error, then dead-letter)
      -> tokenize, generate; TokenChunks stream to reply_to as tokens come
      -> final InferenceResult (publisher confirm, mandatory)
      -> record as answered -> settle -> TimingReport to the telemetry stream

:class:`TaskAnswerer` knows nothing about consuming, dedup or draining (that is
:mod:`node.worker`); it only turns one delivered :class:`~proto.messages_pb2.RoutedTask` into
replies and a settlement. A failure of the engine requeues the task; on its last delivery the
agent gets a typed ``NODE_FAILURE`` instead. How the result is signed, published, settled and
reported (shielded from cancellation once it is out) is :mod:`node.task_outcomes`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from typing import Any

from aio_pika.abc import AbstractChannel
from aio_pika.exceptions import DeliveryError

from node.engine import Engine, GenerationRequest
from node.replies import ConnectionLost, Delivery, reply_to_ok
from node.streaming import ChunkStream, IncrementalDetokenizer
from node.task_outcomes import TaskContext, TaskOutcomes
from node.validation import validate_prompt_tokens, validate_request
from node.worker_config import WorkerConfig, WorkerStats
from proto import errors, messages_pb2
from proto.methods import DEFAULT_METHOD
from proto.topology import Topology

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


class TaskAnswerer:
    """Answers single tasks with an engine; the worker owns one and hands it each task it takes.

    ``outcomes`` publishes, settles and reports what the engine produced; the answerer shares its
    config, topology and stats.
    """

    def __init__(self, outcomes: TaskOutcomes, *, engine: Engine, tokenizer: Any) -> None:
        self.config: WorkerConfig = outcomes.config
        self.topology: Topology = outcomes.topology
        self.stats: WorkerStats = outcomes.stats
        self._engine = engine
        self._tokenizer = tokenizer
        self._outcomes = outcomes
        self._engine_methods: tuple[str, ...] = tuple(getattr(engine, "methods", (DEFAULT_METHOD,)))

    def attach(self, publish_channel: AbstractChannel | None) -> None:
        """Publish replies and reports on this channel (publisher confirms on); ``None`` detaches."""
        self._outcomes.attach(publish_channel)

    async def answer(self, d: Delivery, routed: messages_pb2.RoutedTask, *, arrived: float, concurrency: int) -> None:
        """Validate, compute, reply, settle and report one task.

        :raises ConnectionLost: the connection went away; nothing was settled, RabbitMQ redelivers.
        :raises asyncio.CancelledError: the worker is draining; the caller requeues unless settled.
        """
        await self._answer(d, routed, arrived, concurrency)

    async def reject_malformed(self, d: Delivery) -> None:
        """Dead-letter a task that is not a RoutedTask; tell its sender if the AMQP properties name one."""
        await self._outcomes.reject_malformed(d)

    async def _answer(
        self, d: Delivery, routed: messages_pb2.RoutedTask, arrived: float, concurrency: int
    ) -> None:
        request = routed.request
        ctx = TaskContext(routed=routed, arrived=arrived, concurrency=concurrency)
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
            await self._outcomes.fail(d, ctx, exc)
            return
        await self._generate_and_reply(d, ctx)

    async def _generate_and_reply(self, d: Delivery, ctx: TaskContext) -> None:
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
            publish=lambda body, kind: self._outcomes.publish_reply(request.request_id, request.reply_to, body, kind),
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
            await self._outcomes.reply_queue_gone(d, request, exc)
            return
        except errors.DinetError as exc:  # a typed verdict of the engine (no route, retries exhausted, ...)
            await stream.abort()
            await self._outcomes.fail(d, ctx, exc)
            return
        except Exception as exc:
            await stream.abort()
            await self._outcomes.engine_failed(d, ctx, exc)
            return
        if late is not None:
            await self._outcomes.fail(d, ctx, late)
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
        await self._outcomes.finish(d, ctx, result, settle="ack")

    def _seed_for(self, request: messages_pb2.InferenceRequest) -> int | None:
        """The agent's seed, or one derived from the request id: a retried request samples the same tokens."""
        if request.sampling.temperature <= 0:
            return None
        if request.sampling.has_seed:
            return int(request.sampling.seed)
        return int.from_bytes(hashlib.sha256(request.request_id.encode()).digest()[:8], "big")
