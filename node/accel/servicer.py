"""The accelerated ``BlockService`` handlers: one session's steps, from checks to the batched forward.

A step whose ``position`` is below the session's cache length rolls the cache back to it
(speculative decoding); above it is an error. Bad tensors get INVALID_ARGUMENT, a full node
RESOURCE_EXHAUSTED; neither touches other sessions. A session reserves its cache at ``max_length``
against the node's budget, may start from a leased prefix (:mod:`node.accel.session_metadata`),
and offers the prompt blocks it completes to the prefix cache.

Kept apart from :mod:`node.accel.server`, which loads the blocks and listens (gRPC options,
access, port): this module is what happens per call, and the one to read against the wire contract.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc
import torch

from node.accel.batch_stream import serve_batch_stream
from node.accel.batcher import StepBatcher
from node.accel.executor import BlockExecutor
from node.accel.kv import SequenceKV
from node.accel.prefix_cache import PrefixCache, PrefixLease
from node.accel.session_metadata import MD_PREFIX_HIT, SessionOptions
from proto import blocks_pb2, blocks_pb2_grpc
from proto.codec import TensorDecodeError, TensorLimits, decode_tensor, encode_tensor

if TYPE_CHECKING:
    from node.accel.server import AccelServerConfig


class _StepError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class AccelBlockServicer(blocks_pb2_grpc.BlockServiceServicer):
    def __init__(self, config: AccelServerConfig, executor: BlockExecutor, batcher: StepBatcher) -> None:
        self.config = config
        self.executor = executor
        self.batcher = batcher
        self.prefix_cache = PrefixCache(block_tokens=config.prefix_block_tokens, max_bytes=config.prefix_cache_bytes)
        self.reserved_bytes = 0
        self.active_sessions = 0
        self.batch_messages = 0  # StepBatch messages served on InferenceBatch streams
        self.limits = TensorLimits(max_bytes=config.max_message_bytes)

    @property
    def load(self) -> float:
        """Share of the session cache budget in use (announced in the node's DHT record)."""
        return self.reserved_bytes / max(1, self.config.cache_budget_bytes)

    @property
    def free_cache_bytes(self) -> int:
        return max(0, self.config.cache_budget_bytes - self.reserved_bytes)

    def close(self) -> None:
        """Stop the step loop without waiting (for owners that stop the gRPC server themselves)."""
        self.batcher.close_nowait()

    def _check_hidden(self, message: blocks_pb2.Tensor, max_tokens: int) -> torch.Tensor:
        try:
            hidden = decode_tensor(message, self.limits)
        except TensorDecodeError as exc:
            raise _StepError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        if not hidden.is_floating_point():
            raise _StepError(grpc.StatusCode.INVALID_ARGUMENT, f"hidden states must be floating, got {message.dtype}")
        shape = tuple(hidden.shape)
        if len(shape) != 3 or shape[0] != 1 or not 1 <= shape[1] <= max_tokens or shape[2] != self.executor.hidden_size:
            raise _StepError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"hidden must be [1, 1..{max_tokens}, {self.executor.hidden_size}], got {list(shape)}",
            )
        return hidden[0]

    def _check_span(self, model: str, start: int, end: int) -> None:
        if model != self.config.model_name or start != self.config.start or end != self.config.end:
            raise _StepError(  # NOT_FOUND, like the plain server: the driver routes elsewhere
                grpc.StatusCode.NOT_FOUND,
                f"this node serves {self.config.model_name} blocks {self.config.start}:{self.config.end}, "
                f"not {model} {start}:{end}",
            )

    async def Forward(self, request: blocks_pb2.ForwardRequest, context: grpc.aio.ServicerContext):
        try:
            self._check_span(request.model, request.start_block, request.end_block)
            hidden = self._check_hidden(request.hidden, self.config.max_step_tokens)
        except _StepError as exc:
            await context.abort(exc.code, str(exc))
        kv = self.executor.new_cache(capacity=hidden.shape[0])
        out = await self.batcher.submit(kv, hidden, solo=True)
        return blocks_pb2.ForwardResponse(hidden=encode_tensor(out.unsqueeze(0)))

    async def Info(self, request: blocks_pb2.InfoRequest, context: grpc.aio.ServicerContext) -> blocks_pb2.NodeInfo:
        return blocks_pb2.NodeInfo(
            model=self.config.model_name,
            start_block=self.config.start,
            end_block=self.config.end,
            num_blocks=int(self.executor.config.num_hidden_layers),
            free_cache_bytes=max(0, self.config.cache_budget_bytes - self.reserved_bytes),
            active_sessions=self.active_sessions,
        )

    async def Inference(
        self, request_iterator: AsyncIterator[blocks_pb2.InferenceStep], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[blocks_pb2.InferenceStepResult]:
        metadata = {str(k): str(v) for k, v in context.invocation_metadata() or ()}
        try:
            options = SessionOptions.parse(metadata, self.config.prefix_block_tokens)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        lease: PrefixLease | None = self.prefix_cache.acquire(options.prefix_hashes) if options.prefix_hashes else None
        await context.send_initial_metadata(((MD_PREFIX_HIT, str(lease.tokens if lease else 0)),))
        kv: SequenceKV | None = None
        reserved = 0
        stored = 0  # leading prefix blocks already offered to the prefix cache
        self.active_sessions += 1
        self.batcher.session_opened(batching=not options.solo)
        iterator = request_iterator.__aiter__()
        try:
            while True:
                try:
                    async with asyncio.timeout(self.config.session_idle_s):  # no task per message, unlike wait_for
                        step = await iterator.__anext__()
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "session idle for too long; closed")
                    return
                try:
                    if kv is None:  # the session's target travels in its first step (later ones may omit it)
                        self._check_span(step.model, step.start_block, step.end_block)
                        kv, reserved = self._open_session(step, lease)
                        stored = kv.length // self.config.prefix_block_tokens
                    if step.close and not step.HasField("hidden"):
                        return
                    hidden = self._check_hidden(step.hidden, self.config.max_step_tokens)
                    if step.position > kv.length:
                        raise _StepError(
                            grpc.StatusCode.INVALID_ARGUMENT,
                            f"step at position {step.position} but the session holds {kv.length} tokens",
                        )
                    n_new = hidden.shape[0]
                    if step.position + n_new > reserved // kv.bytes_per_token():
                        raise _StepError(grpc.StatusCode.INVALID_ARGUMENT, "step goes past the session's max_length")
                except _StepError as exc:
                    await context.abort(exc.code, str(exc))
                    return
                kv.truncate(step.position)
                out = await self.batcher.submit(kv, hidden, solo=options.solo, window_ms=options.window_ms)
                stored = self._offer_prefix(kv, options.prefix_hashes, stored)
                if self.config.reply_delay_s > 0:
                    await asyncio.sleep(self.config.reply_delay_s)
                yield blocks_pb2.InferenceStepResult(hidden=encode_tensor(out.unsqueeze(0)), position=kv.length)
                if step.close:
                    return
        finally:
            self.active_sessions -= 1
            self.batcher.session_closed(batching=not options.solo, kv=kv)
            self.reserved_bytes -= reserved
            if lease is not None:
                self.prefix_cache.release(lease)

    async def InferenceBatch(
        self, request_iterator: AsyncIterator[blocks_pb2.StepBatch], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[blocks_pb2.StepBatchResult]:
        """Many sessions' steps per message (:mod:`node.accel.batch_stream`)."""
        async for reply in serve_batch_stream(self, request_iterator, context):
            yield reply

    def _open_session(self, step: blocks_pb2.InferenceStep, lease: PrefixLease | None) -> tuple[SequenceKV, int]:
        max_length = step.max_length or self.config.max_session_length
        if max_length > self.config.max_session_length:
            raise _StepError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"max_length {max_length} exceeds this node's limit of {self.config.max_session_length}",
            )
        kv = self.executor.new_cache(capacity=min(max_length, 256))
        reserved = max_length * kv.bytes_per_token()
        if self.reserved_bytes + reserved > self.config.cache_budget_bytes:
            raise _StepError(grpc.StatusCode.RESOURCE_EXHAUSTED, "this node's session cache budget is full")
        start = step.position
        if start:
            held = lease.tokens if lease else 0
            if start > held or start % self.config.prefix_block_tokens:
                raise _StepError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"new session starts at position {start} but this node holds a prefix of {held} tokens",
                )
            if lease is not None:  # always true here: held > 0
                kv.extend_from(lease.blocks[: start // self.config.prefix_block_tokens])
        if lease is not None:
            self.prefix_cache.release(lease)  # copied what we need; let the cache evict again
        self.reserved_bytes += reserved
        return kv, reserved

    def _offer_prefix(self, kv: SequenceKV, hashes: tuple[str, ...], stored: int) -> int:
        """Add the session's newly completed prompt blocks to the prefix cache."""
        block = self.config.prefix_block_tokens
        while stored < len(hashes) and (stored + 1) * block <= kv.length:
            if hashes[stored] not in self.prefix_cache:
                self.prefix_cache.insert(hashes[stored], kv.export_range(stored * block, (stored + 1) * block))
            stored += 1
        return stored
