"""Server side of ``BlockService.InferenceBatch``: many sessions' steps per message on one stream.

A driver with many sessions on a hop sends their ready steps together (one ``StepBatch``), instead
of one ``Inference`` message per session. The hop then knows the whole group is there: it queues
the steps with :meth:`~node.accel.batcher.StepBatcher.submit_group`, which runs them in one forward
at once instead of waiting for stragglers, and answers with one ``StepBatchResult``.

Each session still has its own KV cache and cache reservation, opened by its first step on the
stream and released by a closing step or the end of the stream, so sessions join and leave between
messages. Every step is validated on its own like an ``Inference`` step (span, tensor, position,
max_length); one that fails is answered with its status code and its session is closed, while the
other steps of the message run normally.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
import torch

from node.accel.executor import StepItem
from node.accel.kv import SequenceKV
from proto import blocks_pb2
from proto.codec import encode_tensor

if TYPE_CHECKING:
    from node.accel.servicer import AccelBlockServicer

MAX_STEPS_PER_MESSAGE = 1024
MAX_SESSION_ID_CHARS = 128


@dataclass
class _Session:
    kv: SequenceKV
    reserved: int  # bytes of the node's cache budget held for this session


class _Failed(Exception):
    """One step's failure: answered in its result, closes its session only."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class BatchStream:
    """The sessions of one ``InferenceBatch`` stream and how its messages are served."""

    def __init__(self, servicer: AccelBlockServicer) -> None:
        self.servicer = servicer
        self.sessions: dict[str, _Session] = {}

    def _close(self, session_id: str) -> None:
        session = self.sessions.pop(session_id, None)
        if session is None:
            return
        self.servicer.active_sessions -= 1
        self.servicer.reserved_bytes -= session.reserved
        self.servicer.batcher.session_closed(batching=False, kv=session.kv)

    def close_all(self) -> None:
        for session_id in list(self.sessions):
            self._close(session_id)

    def _prepare(self, step: blocks_pb2.InferenceStep) -> tuple[SequenceKV, torch.Tensor] | None:
        """Validate ``step`` (opening its session when new); None for a closing step without hidden states.

        :raises _Failed: when the step cannot run.
        """
        from node.accel.servicer import _StepError  # the servicer's checks raise it

        servicer = self.servicer
        try:
            session = self.sessions.get(step.session_id)
            if session is None:
                if step.close and not step.HasField("hidden"):
                    return None  # closing a session this stream does not hold: nothing to do
                servicer._check_span(step.model, step.start_block, step.end_block)
                kv, reserved = servicer._open_session(step, None)
                session = _Session(kv, reserved)
                self.sessions[step.session_id] = session
                servicer.active_sessions += 1
                servicer.batcher.session_opened(batching=False)
            if step.close and not step.HasField("hidden"):
                return None
            hidden = servicer._check_hidden(step.hidden, servicer.config.max_step_tokens)
            kv = session.kv
            if step.position > kv.length:
                raise _StepError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"step at position {step.position} but the session holds {kv.length} tokens",
                )
            if step.position + hidden.shape[0] > session.reserved // kv.bytes_per_token():
                raise _StepError(grpc.StatusCode.INVALID_ARGUMENT, "step goes past the session's max_length")
        except _StepError as exc:
            raise _Failed(exc.code, str(exc)) from None
        kv.truncate(step.position)
        return kv, hidden

    async def serve(self, message: blocks_pb2.StepBatch) -> blocks_pb2.StepBatchResult:
        """Run one message's steps together; every step gets a result, in order.

        :raises ValueError: for a malformed message as a whole (too many steps, duplicate or bad ids).
        """
        steps = list(message.steps)
        if len(steps) > MAX_STEPS_PER_MESSAGE:
            raise ValueError(f"at most {MAX_STEPS_PER_MESSAGE} steps per message, got {len(steps)}")
        ids = [step.session_id for step in steps]
        if len(set(ids)) != len(ids):
            raise ValueError("a message holds two steps of the same session")
        if any(not sid or len(sid) > MAX_SESSION_ID_CHARS for sid in ids):
            raise ValueError(f"every step needs a session_id of 1..{MAX_SESSION_ID_CHARS} characters")
        self.servicer.batch_messages += 1
        results = [blocks_pb2.BatchStepResult(session_id=sid) for sid in ids]
        runnable: list[tuple[int, StepItem]] = []
        for i, step in enumerate(steps):
            try:
                prepared = self._prepare(step)
            except _Failed as exc:
                results[i].error_code, results[i].error = exc.code.value[0], str(exc)
                self._close(step.session_id)
                continue
            if prepared is None:
                self._close(step.session_id)
            else:
                runnable.append((i, StepItem(*prepared)))
        if runnable:
            futures = self.servicer.batcher.submit_group([item for _, item in runnable])
            outputs = await asyncio.gather(*futures, return_exceptions=True)
            if self.servicer.config.reply_delay_s > 0:
                await asyncio.sleep(self.servicer.config.reply_delay_s)
            for (i, item), out in zip(runnable, outputs, strict=True):
                if isinstance(out, BaseException):
                    results[i].error_code = grpc.StatusCode.INTERNAL.value[0]
                    results[i].error = f"forward failed: {out}"
                    self._close(ids[i])
                    continue
                results[i].result.CopyFrom(
                    blocks_pb2.InferenceStepResult(hidden=encode_tensor(out.unsqueeze(0)), position=item.kv.length)
                )
                if steps[i].close:
                    self._close(ids[i])
        return blocks_pb2.StepBatchResult(results=results)


async def serve_batch_stream(
    servicer: AccelBlockServicer,
    request_iterator: AsyncIterator[blocks_pb2.StepBatch],
    context: grpc.aio.ServicerContext,
) -> AsyncIterator[blocks_pb2.StepBatchResult]:
    """The ``InferenceBatch`` rpc: one result message per request message, until the client stops."""
    stream = BatchStream(servicer)
    iterator = request_iterator.__aiter__()
    try:
        while True:
            try:
                async with asyncio.timeout(servicer.config.session_idle_s):
                    message = await iterator.__anext__()
            except StopAsyncIteration:
                return
            except TimeoutError:
                await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "batch stream idle for too long; closed")
                return
            try:
                reply = await stream.serve(message)
            except ValueError as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
                return
            yield reply
    finally:
        stream.close_all()
