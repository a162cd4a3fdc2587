"""How a task leaves the node once its answer (or its refusal) is decided: result, ack, report.

    sign the final result -> publish it (publisher confirm, mandatory) -> record as answered
      -> settle (ack, or reject = dead-letter, or nack = requeue) -> TimingReport to telemetry

Kept apart from :mod:`node.task_answer`, which computes the answer, because these are the rules
that must hold whatever the computation did: every final result, ok or error, is signed just before
it is published with the node's DHT record key (:mod:`proto.result_signing`; one signature per
request, chunks are not signed); once a result is out, the publish -> record -> ack step is shielded
from cancellation, so a shutdown never turns an answered task into a requeue; a failed engine
requeues the task until its last delivery, which the agent gets as a typed ``NODE_FAILURE``.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from aio_pika.abc import AbstractChannel
from aio_pika.exceptions import DeliveryError

from node.replies import ConnectionLost, Delivery, error_result, publish_reply, reply_to_ok
from node.streaming import RESULT_TYPE
from node.telemetry import build_report, shared_prefix_ratio
from node.worker_config import WorkerConfig, WorkerStats
from proto import errors, messages_pb2
from proto.common_pb2 import ErrorCode
from proto.result_signing import ResultSigner
from proto.telemetry import publish_entry_best_effort
from proto.topology import DELIVERY_LIMIT, Topology

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class TaskContext:
    """What the steps of one task share (the answerer fills it, the outcomes read it)."""

    routed: messages_pb2.RoutedTask
    arrived: float  # unix time the task reached this node
    concurrency: int  # other tasks in flight here when it arrived
    prompt_ids: tuple[int, ...] = ()
    chunks: int = 0  # TokenChunk messages sent


class TaskOutcomes:
    """Publishes, settles and reports the outcome of each task; the answerer owns one.

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
        remember_answered: Callable[[str], None],
        signer: ResultSigner,
    ) -> None:
        self.config = config
        self._signer = signer
        self.topology = topology
        self.stats = stats
        self._remember_answered = remember_answered
        self._publish_channel: AbstractChannel | None = None
        self._recent_prompts: deque[tuple[int, ...]] = deque(maxlen=64)

    def attach(self, publish_channel: AbstractChannel | None) -> None:
        """Publish replies and reports on this channel (publisher confirms on); ``None`` detaches."""
        self._publish_channel = publish_channel

    async def finish(self, d: Delivery, ctx: TaskContext, result: messages_pb2.InferenceResult, *, settle: str) -> None:
        """Publish the final result, remember it, settle the task, then report it.

        Once started this step is shielded from cancellation: a result that went out is
        always followed by its ack, so a shutdown never turns it into a requeue.
        """
        d.finishing = asyncio.create_task(self._finish_unshielded(d, ctx, result, settle))
        await asyncio.shield(d.finishing)

    async def _finish_unshielded(
        self, d: Delivery, ctx: TaskContext, result: messages_pb2.InferenceResult, settle: str
    ) -> None:
        request = ctx.routed.request
        try:
            await self._publish_result(request.reply_to, result)
        except DeliveryError as exc:
            await self.reply_queue_gone(d, request, exc)
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

    async def _report(self, ctx: TaskContext, result: messages_pb2.InferenceResult) -> None:
        """One row of the meta-training set / reputation ledger (best effort: the agent has its answer)."""
        shared = shared_prefix_ratio(ctx.prompt_ids, list(self._recent_prompts))
        if ctx.prompt_ids:
            self._recent_prompts.append(ctx.prompt_ids)
        report = build_report(routed=ctx.routed, result=result, hardware=self.config.hardware,
                              shared_prefix=shared, concurrency=ctx.concurrency)
        if self._publish_channel is not None:
            await publish_entry_best_effort(self._publish_channel, self.topology, report, app_id=result.node_id)

    async def fail(self, d: Delivery, ctx: TaskContext, exc: errors.DinetError) -> None:
        """Answer with a typed error and dead-letter the task."""
        request = ctx.routed.request
        result = self._error_result(request.request_id, exc, ctx.routed.decision.method)
        result.timing.prompt_tokens = len(ctx.prompt_ids)
        result.timing.queue_s = max(0.0, ctx.arrived - request.submitted_at) if request.submitted_at else 0.0
        self.stats.dead_lettered += 1
        await self.finish(d, ctx, result, settle="reject")

    async def engine_failed(self, d: Delivery, ctx: TaskContext, exc: BaseException) -> None:
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
        await self.fail(d, ctx, failure)

    async def reject_malformed(self, d: Delivery) -> None:
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

    async def reply_queue_gone(self, d: Delivery, request: messages_pb2.InferenceRequest, exc: Exception) -> None:
        logger.warning("task %s: reply queue %r does not exist (%s); dead-lettering the task",
                       request.request_id, request.reply_to, exc)
        self.stats.dead_lettered += 1
        await d.settle("reject")

    def _error_result(self, request_id: str, exc: errors.DinetError, method: str = "") -> messages_pb2.InferenceResult:
        return error_result(request_id, exc, node_id=self.config.node_id, group=self.config.group, method=method)

    async def _publish_result(self, reply_to: str, result: messages_pb2.InferenceResult) -> None:
        """Sign (last: nothing may change a signed field after this) and publish a final result."""
        body = self._signer.sign(result).SerializeToString()
        await self.publish_reply(result.request_id, reply_to, body, RESULT_TYPE)

    async def publish_reply(self, request_id: str, reply_to: str, body: bytes, kind: str) -> None:
        await publish_reply(self._publish_channel, request_id=request_id, reply_to=reply_to, body=body, kind=kind,
                            node_id=self.config.node_id, timeout_s=self.config.publish_timeout_s)
