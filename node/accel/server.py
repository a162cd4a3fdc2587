"""A gRPC BlockService that applies acceleration methods on the server side of every hop.

Same wire contract as the plain block server (``proto/blocks.proto``), plus per-session options
carried in the stream's invocation metadata, so no message changes:

- ``dinet-method``: the request's method name (``proto.methods``); methods without batching run
  their steps alone (the baseline), batching methods share forwards with other sessions
  (:class:`~node.accel.batcher.StepBatcher`), dynamic batching waits ``batch_window_ms`` first.
- ``dinet-prefix-block`` and ``dinet-prefix-hashes``: the block size and chained hashes of the
  prompt's full blocks (:func:`~node.accel.prefix_cache.prefix_block_hashes`). The server answers
  in its initial metadata ``dinet-prefix-hit`` = leading tokens it holds (pinned for the session);
  the first step may then start at any ``position`` up to that, and the server fills the session's
  cache from the prefix cache. Blocks the session computes are added to the cache as they finish.

A step whose ``position`` is below the session's cache length rolls the cache back to it
(speculative decoding); above it is an error. Bad tensors get INVALID_ARGUMENT, a full node
RESOURCE_EXHAUSTED; neither touches other sessions.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import torch

from node.accel.batch_stream import serve_batch_stream
from node.accel.batcher import StepBatcher
from node.accel.batching import BatchPolicy
from node.accel.executor import BlockExecutor
from node.accel.kv import SequenceKV
from node.accel.prefix_cache import PrefixCache, PrefixLease
from node.blocks.access import SwarmAccess
from node.blocks.tls import TlsConfig
from proto import blocks_pb2, blocks_pb2_grpc
from proto.codec import TensorDecodeError, TensorLimits, decode_tensor, encode_tensor
from proto.methods import METHODS

logger = logging.getLogger(__name__)

MD_METHOD = "dinet-method"
MD_PREFIX_BLOCK = "dinet-prefix-block"
MD_PREFIX_HASHES = "dinet-prefix-hashes"
MD_PREFIX_HIT = "dinet-prefix-hit"
_HASH_RE = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True)
class AccelServerConfig:
    """One accelerated block server."""

    model_path: Path  # local model directory (config.json + safetensors)
    model_name: str  # name peers use in requests
    start: int  # first block served
    end: int  # one past the last block served
    weight_format: str = "fp32"  # "fp32" | "bf16" | "int8": how this node's consumer group loads weights
    policy: BatchPolicy = field(default_factory=BatchPolicy)  # continuous/dynamic batching limits
    prefix_block_tokens: int = 32  # prefix-cache granularity, tokens per cached block
    prefix_cache_bytes: int = 256 * 1024 * 1024  # prefix cache budget
    cache_budget_bytes: int = 2 * 1024**3  # session KV caches budget (reserved at max_length)
    max_session_length: int = 4096  # longest session a client may ask for
    max_step_tokens: int = 4096  # most new tokens in one step
    session_idle_s: float = 120.0  # a session stream with no step for this long is closed
    max_message_bytes: int = 64 * 1024 * 1024  # gRPC message cap, both directions
    reply_delay_s: float = 0.0  # emulated network delay added before each step's reply (benchmarks only)
    host: str = "127.0.0.1"
    port: int = 0  # 0 = any free port
    # shared secret of a private swarm (node/blocks/auth.py): calls without it get UNAUTHENTICATED; "" = open
    swarm_token: str = field(default="", repr=False)
    tls: TlsConfig | None = None  # serve only TLS with the swarm's private CA (node/blocks/tls.py); None = plaintext


@dataclass(frozen=True)
class SessionOptions:
    """What a client asked for in the stream metadata."""

    solo: bool
    window_ms: float
    prefix_hashes: tuple[str, ...]

    @classmethod
    def parse(cls, metadata: dict[str, str], prefix_block_tokens: int) -> SessionOptions:
        """:raises ValueError: for an unknown method or malformed prefix hashes."""
        name = metadata.get(MD_METHOD, "baseline")
        if name not in METHODS:
            raise ValueError(f"unknown method {name!r} in {MD_METHOD}")
        method = METHODS[name]
        batching = method.continuous_batching or method.dynamic_batching
        window = method.batch_window_ms if method.dynamic_batching else 0.0
        hashes: tuple[str, ...] = ()
        raw = metadata.get(MD_PREFIX_HASHES, "")
        if raw:
            if metadata.get(MD_PREFIX_BLOCK, "") != str(prefix_block_tokens):
                raw = ""  # a different granularity cannot match; run without the prefix cache
            hashes = tuple(h for h in raw.split(",") if h)
            if len(hashes) > 4096 or not all(_HASH_RE.match(h) for h in hashes):
                raise ValueError(f"{MD_PREFIX_HASHES} must be at most 4096 comma-separated 32-hex-digit hashes")
        return cls(solo=not batching, window_ms=window, prefix_hashes=hashes)


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


class AccelBlockServer:
    """An accelerated block server listening on a port: ``server = await AccelBlockServer.create(config)``."""

    def __init__(self, config: AccelServerConfig, servicer: AccelBlockServicer, server: grpc.aio.Server, port: int):
        self.config = config
        self.servicer = servicer
        self._server = server
        self.port = port

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    @property
    def grpc_server(self) -> grpc.aio.Server:
        return self._server

    @classmethod
    async def create(cls, config: AccelServerConfig, executor: BlockExecutor | None = None) -> AccelBlockServer:
        if executor is None:
            executor = await asyncio.to_thread(
                BlockExecutor.load, config.model_path, config.start, config.end, weight_format=config.weight_format
            )
        batcher = StepBatcher(executor, config.policy)
        await batcher.start()
        servicer = AccelBlockServicer(config, executor, batcher)
        options = [
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.max_receive_message_length", config.max_message_bytes),
            # drivers keep their channels alive with pings (node.blocks.wire.grpc_options): accept them
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
            ("grpc.http2.max_ping_strikes", 0),
        ]
        access = SwarmAccess(swarm_token=config.swarm_token, tls=config.tls)  # the same as node/blocks' server
        server = access.server(options)
        blocks_pb2_grpc.add_BlockServiceServicer_to_server(servicer, server)
        port = access.bind(server, config.host, config.port)
        await server.start()
        logger.info(
            "accelerated block server for %s %d:%d on port %d", config.model_name, config.start, config.end, port
        )
        return cls(config, servicer, server, port)

    async def close(self, grace: float = 1.0) -> None:
        await self._server.stop(grace)
        await self.servicer.batcher.close()
