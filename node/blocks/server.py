"""gRPC ``BlockService`` of a node: the wire edge around :mod:`node.blocks.block_functions`.

- ``Forward``: a stateless pass through (a sub-range of) the node's blocks.
- ``Inference``: a bidirectional stream per session. The first message opens the
  session (model, blocks, ``max_length``, batch from the tensor) and charges its whole
  KV cache to the node's budget (RESOURCE_EXHAUSTED when it does not fit); each message
  is one step of one or more tokens, answered by one message. A ``position`` below the
  cache length rolls the cache back first (replays, speculative rejections).
- ``Info``: what the node serves and how loaded it is.

Every tensor from a peer goes through :func:`proto.codec.decode_tensor` and a shape
check; a bad one ends only its own stream with INVALID_ARGUMENT. Compute runs on one
dedicated thread, so the event loop keeps serving other streams while a step computes
and no two steps touch the modules at once. Messages are bounded: the gRPC maximum is
the largest tensor a session may legally send plus a small envelope.

- ``Push``: server-to-server. A step may carry a ``route`` (the hops after this one,
  see :mod:`node.blocks.push`): the output then also goes straight into ``route[0]``'s
  session, and that hop's own output onward, so a token crosses n + 1 messages instead
  of 2n. Every step, pushed or not, is answered to the driver on its session stream.
  Steps are numbered by the driver; a session applies each ``step_id`` at most once, in
  increasing order, so a stale push (the driver already carried the step itself after a
  failure) or a cycle is dropped rather than recomputed.

The bounds and channel options both ends share (:class:`ServerLimits`,
:func:`grpc_options`, the message envelope) are in :mod:`node.blocks.wire`; the first two
are re-exported here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
import torch

from node.blocks.access import SwarmAccess
from node.blocks.block_functions import BlockSpan, run_span
from node.blocks.kv_cache import CacheFullError, CacheManager, SessionCache
from node.blocks.push import (
    MAX_SESSION_ID,
    NoPush,
    PushChannels,
    PushError,
    PushLink,
    PushPolicy,
    PushTarget,
    RouteError,
    parse_route,
)
from node.blocks.tls import TlsConfig
from node.blocks.wire import ServerLimits, grpc_options
from proto import blocks_pb2, blocks_pb2_grpc, common_pb2
from proto.codec import TensorDecodeError, TensorLimits, decode_tensor, encode_tensor
from proto.records import HardwareInfo

logger = logging.getLogger(__name__)


class StepError(Exception):
    """A request a peer got wrong; carries the gRPC status to end its stream with."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(eq=False)
class _Live:
    """A session open on this node: its cache, the driver's stream, and where its outputs are pushed."""

    session_id: str
    start: int
    end: int
    cache: SessionCache
    context: grpc.aio.ServicerContext  # the driver's stream: every step is answered there
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # driver steps and pushed steps, one at a time
    last_step: int = 0  # highest step id applied
    link: PushLink | None = None  # Push stream into the next hop's session


class BlockServicer(blocks_pb2_grpc.BlockServiceServicer):
    """Serves one :class:`BlockSpan` of ``model_name``."""

    def __init__(
        self,
        *,
        span: BlockSpan,
        model_name: str,
        caches: CacheManager,
        limits: ServerLimits,
        node_id: Callable[[], str] = lambda: "",
        hardware: HardwareInfo | None = None,
        throughput_tok_s: float = 0.0,
        push_policy: PushPolicy | None = None,
        push_channels: PushChannels | None = None,
    ) -> None:
        self.span = span
        self.model_name = model_name
        self.caches = caches
        self.limits = limits
        self.node_id = node_id
        self.hardware = hardware or HardwareInfo()
        self.throughput_tok_s = throughput_tok_s
        self.push_policy: PushPolicy = push_policy or NoPush()
        self.num_blocks = int(span.config.num_hidden_layers)
        self.max_length = min(limits.max_length, int(span.config.max_position_embeddings))
        self.tensor_limits = TensorLimits(max_bytes=limits.max_tensor_bytes(span.hidden_size))
        self._compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="blocks-compute")
        self._per_peer: Counter[str] = Counter()  # open sessions by peer host
        self._live: dict[str, _Live] = {}  # open sessions by id (what pushes may target)
        self.push_channels = push_channels or PushChannels(
            grpc_options(limits.max_message_bytes(span.hidden_size)), timeout_s=limits.push_timeout_s
        )

    def close(self) -> None:
        self._compute.shutdown(wait=False, cancel_futures=True)

    async def aclose(self) -> None:
        """:meth:`close` plus the channels this node pushes through."""
        self.close()
        await self.push_channels.close()

    @property
    def load(self) -> float:
        return self.caches.active_sessions / max(self.limits.max_sessions, 1)

    # -- RPCs -------------------------------------------------------------------------------------

    async def Forward(
        self, request: blocks_pb2.ForwardRequest, context: grpc.aio.ServicerContext
    ) -> blocks_pb2.ForwardResponse:
        try:
            start, end = self._check_target(request.model, request.start_block, request.end_block)
            hidden = self._decode_hidden(request.hidden, batch=None)
            if hidden.shape[1] > self.max_length:
                raise StepError(grpc.StatusCode.INVALID_ARGUMENT, f"{hidden.shape[1]} tokens > {self.max_length}")
        except StepError as exc:
            await context.abort(exc.code, str(exc))
        out = await self._run(hidden, start=start, end=end, position=0, cache=None)
        return blocks_pb2.ForwardResponse(hidden=encode_tensor(out))

    async def Inference(  # type: ignore[override]
        self, request_iterator: AsyncIterator[blocks_pb2.InferenceStep], context: grpc.aio.ServicerContext
    ) -> None:
        live: _Live | None = None
        peer = _peer_host(context.peer())
        try:
            async for step in request_iterator:
                if live is None:
                    if self._per_peer[peer] >= self.limits.max_sessions_per_peer:
                        raise StepError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                        f"{peer} already holds {self.limits.max_sessions_per_peer} sessions here")
                    live = self._open(step, context)
                    self._per_peer[peer] += 1
                if step.close and not step.HasField("hidden"):
                    break
                async with live.lock:
                    await self._step(live, step, pushed=False)
                if step.close:
                    break
        except StepError as exc:
            logger.info("session %s: %s %s", live.session_id if live else "?", exc.code.name, exc)
            await context.abort(exc.code, str(exc))
        finally:
            if live is not None:
                self._end(live, peer)

    async def Push(
        self, request_iterator: AsyncIterator[blocks_pb2.InferenceStep], context: grpc.aio.ServicerContext
    ) -> blocks_pb2.PushReceipt:
        """Steps pushed by the previous hop into sessions open here; each is answered to that session's driver."""
        count = 0
        async for step in request_iterator:
            live = self._live.get(step.session_id)
            if live is None:
                await context.abort(grpc.StatusCode.NOT_FOUND, "no such session open here (closed or expired)")
            assert live is not None  # abort raises
            async with live.lock:
                try:
                    await self._step(live, step, pushed=True)
                except Exception as exc:  # the session's driver hears of it and moves the span
                    reason = f"{exc.code.name}: {exc}" if isinstance(exc, StepError) else f"INTERNAL: {exc!r}"
                    logger.info("session %s: pushed step %d rejected: %s", live.session_id, step.step_id, reason)
                    with contextlib.suppress(Exception):  # the driver's stream may be gone as well
                        await self._answer(live, blocks_pb2.InferenceStepResult(step_id=step.step_id,
                                                                                rejected=reason))
            count += 1
        return blocks_pb2.PushReceipt(steps=count)

    async def Info(
        self, request: blocks_pb2.InfoRequest, context: grpc.aio.ServicerContext
    ) -> blocks_pb2.NodeInfo:
        hw = self.hardware
        return blocks_pb2.NodeInfo(
            node_id=self.node_id(),
            model=self.model_name,
            start_block=self.span.start,
            end_block=self.span.end,
            num_blocks=int(self.span.config.num_hidden_layers),
            hardware=common_pb2.HardwareProfile(
                cpu_cores=hw.cpu_cores, ram_gb=hw.ram_gb, accelerator=hw.accelerator, gflops=hw.gflops,
                mem_bandwidth_gbs=hw.mem_bandwidth_gbs, net_rtt_ms=hw.net_rtt_ms, weight_format=hw.weight_format,
                threads=hw.threads, price_per_hour=hw.price_per_hour, description=hw.description,
            ),
            throughput_tok_s=self.throughput_tok_s,
            free_cache_bytes=self.caches.free_bytes,
            active_sessions=self.caches.active_sessions,
        )

    # -- helpers ----------------------------------------------------------------------------------

    async def _run(
        self, hidden: torch.Tensor, *, start: int, end: int, position: int, cache: SessionCache | None
    ) -> torch.Tensor:
        if hidden.shape[0] * hidden.shape[1] <= self.limits.inline_tokens:
            # a decode step takes milliseconds: computing it right here saves two thread hand-offs per
            # token, which is most of what a hop costs on loopback
            return run_span(self.span, hidden, position=position, cache=cache, start=start, end=end)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._compute, lambda: run_span(self.span, hidden, position=position, cache=cache, start=start, end=end)
        )

    def _check_target(self, model: str, start: int, end: int) -> tuple[int, int]:
        if model != self.model_name:
            raise StepError(grpc.StatusCode.NOT_FOUND, f"this node serves {self.model_name!r}, not {model!r}")
        if not self.span.start <= start < end <= self.span.end:
            raise StepError(
                grpc.StatusCode.NOT_FOUND, f"blocks {start}:{end} not inside served {self.span.start}:{self.span.end}"
            )
        return start, end

    def _open(self, step: blocks_pb2.InferenceStep, context: grpc.aio.ServicerContext) -> _Live:
        start, end = self._check_target(step.model, step.start_block, step.end_block)
        session_id = step.session_id
        if not 0 < len(session_id) <= MAX_SESSION_ID:
            raise StepError(grpc.StatusCode.INVALID_ARGUMENT, f"session_id must be 1..{MAX_SESSION_ID} characters")
        if not 0 < step.max_length <= self.max_length:
            raise StepError(grpc.StatusCode.INVALID_ARGUMENT, f"max_length must be in 1..{self.max_length}")
        if not step.HasField("hidden") or len(step.hidden.shape) != 3:
            raise StepError(grpc.StatusCode.INVALID_ARGUMENT, "the first step must carry hidden states [B, T, H]")
        batch = int(step.hidden.shape[0])
        if not 0 < batch <= self.limits.max_batch:
            raise StepError(grpc.StatusCode.INVALID_ARGUMENT, f"batch must be in 1..{self.limits.max_batch}")
        spec = self.span.cache_spec(start, end, batch=batch, max_length=step.max_length)
        try:
            cache = self.caches.allocate(session_id, spec)
        except CacheFullError as exc:
            raise StepError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)) from None
        except KeyError as exc:
            raise StepError(grpc.StatusCode.ALREADY_EXISTS, str(exc)) from None
        live = _Live(session_id, start, end, cache, context)
        self._live[session_id] = live
        return live

    def _end(self, live: _Live, peer: str) -> None:
        self.caches.free(live.session_id)
        self._live.pop(live.session_id, None)
        if live.link is not None:
            live.link.abort()
        self._per_peer[peer] -= 1
        if self._per_peer[peer] <= 0:
            del self._per_peer[peer]

    async def _step(self, live: _Live, step: blocks_pb2.InferenceStep, *, pushed: bool) -> None:
        """Apply one step (from the driver, or ``pushed`` by the previous hop), push it on, answer the driver.

        The caller holds ``live.lock``. :raises StepError: for a step this session cannot apply.
        """
        if self.caches.get(live.session_id) is None:
            raise StepError(grpc.StatusCode.ABORTED, f"session {live.session_id} expired; replay it")
        if (pushed or step.route) and not step.step_id:
            raise StepError(grpc.StatusCode.INVALID_ARGUMENT, "pushed steps and steps with a route need a step_id")
        if step.step_id and step.step_id <= live.last_step:
            if pushed:  # stale: the driver carried this step itself after a failure (or a cycle came back)
                return
            raise StepError(grpc.StatusCode.INVALID_ARGUMENT,
                            f"step_id {step.step_id} after {live.last_step}: step ids must increase")
        hidden = self._decode_hidden(step.hidden, batch=live.cache.spec.batch)
        self._check_position(live.cache, step.position, hidden.shape[1])
        try:
            route = parse_route(step.route, after=live.end, num_blocks=self.num_blocks) if step.route else ()
        except RouteError as exc:
            raise StepError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        out = await self._run(hidden, start=live.start, end=live.end, position=step.position, cache=live.cache)
        if step.step_id:
            live.last_step = step.step_id
        result = blocks_pb2.InferenceStepResult(hidden=encode_tensor(out), position=live.cache.length,
                                                step_id=step.step_id)
        if route:  # the next hop first: it is the critical path; the driver's copy is for replays
            try:
                await self._push(live, route[0], step, result.hidden)
                result.pushed = True
            except PushError as exc:
                result.push_error = str(exc)
        await self._answer(live, result)

    async def _push(
        self, live: _Live, target: PushTarget, step: blocks_pb2.InferenceStep, hidden: blocks_pb2.Tensor
    ) -> None:
        if live.link is None or live.link.target != target:
            if not await self.push_policy.allows(self.model_name, target):
                raise PushError(f"{target.address} is not a peer this node knows to serve blocks "
                                f"{target.start}:{target.end} of {self.model_name!r}")
            if live.link is not None:
                live.link.abort()
            live.link = self.push_channels.link(target)
        await live.link.send(blocks_pb2.InferenceStep(
            session_id=target.session_id, hidden=hidden, position=step.position, step_id=step.step_id,
            route=step.route[1:],
        ))

    @staticmethod
    async def _answer(live: _Live, result: blocks_pb2.InferenceStepResult) -> None:
        await live.context.write(result)

    def _decode_hidden(self, message: blocks_pb2.Tensor, *, batch: int | None) -> torch.Tensor:
        try:
            hidden = decode_tensor(message, self.tensor_limits)
        except TensorDecodeError as exc:
            raise StepError(grpc.StatusCode.INVALID_ARGUMENT, f"bad hidden tensor: {exc}") from None
        if not hidden.is_floating_point():
            raise StepError(grpc.StatusCode.INVALID_ARGUMENT, f"hidden states must be floating, not {hidden.dtype}")
        if hidden.dim() != 3 or hidden.shape[1] == 0 or hidden.shape[2] != self.span.hidden_size:
            raise StepError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"hidden states must be [batch, tokens>=1, {self.span.hidden_size}], got {list(hidden.shape)}",
            )
        if batch is not None and hidden.shape[0] != batch:
            raise StepError(grpc.StatusCode.INVALID_ARGUMENT, f"batch {hidden.shape[0]} != session batch {batch}")
        if batch is None and hidden.shape[0] > self.limits.max_batch:
            raise StepError(grpc.StatusCode.INVALID_ARGUMENT, f"batch must be in 1..{self.limits.max_batch}")
        return hidden

    @staticmethod
    def _check_position(cache: SessionCache, position: int, new_tokens: int) -> None:
        if position > cache.length:
            raise StepError(
                grpc.StatusCode.FAILED_PRECONDITION, f"position {position} beyond the {cache.length} cached tokens"
            )
        if position + new_tokens > cache.spec.max_length:
            raise StepError(
                grpc.StatusCode.OUT_OF_RANGE,
                f"position {position} + {new_tokens} tokens exceeds the session's max_length {cache.spec.max_length}",
            )
        if position < cache.length:
            cache.truncate(position)


def _peer_host(peer: str) -> str:
    """``"ipv4:127.0.0.1:5555"`` -> ``"ipv4:127.0.0.1"`` (sessions are counted per host, not per connection)."""
    return peer.rsplit(":", 1)[0] if peer.count(":") > 1 else peer


async def start_grpc_server(
    servicer: BlockServicer, host: str, port: int, *, swarm_token: str = "", tls: TlsConfig | None = None
) -> tuple[grpc.aio.Server, int]:
    """Start serving; returns the server and the bound port (``port=0`` picks a free one).

    With a ``swarm_token``, calls without it are refused with UNAUTHENTICATED (:mod:`node.blocks.auth`);
    with ``tls`` the port speaks only TLS and wants a client certificate from the swarm CA (:mod:`node.blocks.tls`).
    """
    access = SwarmAccess(swarm_token=swarm_token, tls=tls)  # node/blocks/access.py, as the accelerated server
    server = access.server(grpc_options(servicer.limits.max_message_bytes(servicer.span.hidden_size)))
    blocks_pb2_grpc.add_BlockServiceServicer_to_server(servicer, server)
    bound = access.bind(server, host, port)
    await server.start()
    return server, bound
