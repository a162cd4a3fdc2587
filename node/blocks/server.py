"""gRPC ``BlockService`` of a node: the wire edge around :mod:`node.blocks.block_functions`.

- ``Forward``: a stateless pass through (a sub-range of) the node's blocks.
- ``Inference``: a bidirectional stream per session. The first message opens the
  session (model, blocks, ``max_length``, batch from the tensor) and charges its whole
  KV cache to the node's budget (RESOURCE_EXHAUSTED when it does not fit); each message
  is one step of one or more tokens, answered by one message. A ``position`` below the
  cache length rolls the cache back first (replays, speculative rejections).
- ``Info``: what the node serves and how loaded it is.
- ``Push``: server-to-server. A step may carry a ``route`` (the hops after this one,
  see :mod:`node.blocks.push`): the output then also goes straight into ``route[0]``'s
  session, and that hop's own output onward, so a token crosses n + 1 messages instead
  of 2n. Every step, pushed or not, is answered to the driver on its session stream.

This module owns the streams: which session a message belongs to, when it ends, and
the status code it ends with. The rest is one module each, so every rule has one home:
what a peer may send (:mod:`node.blocks.peer_input`: a bad tensor or step ends only its
own stream, with the status its :class:`StepError` carries), the open sessions
(:mod:`node.blocks.sessions`: per-peer admission, cache allocation, lookup for pushes,
release) and what one step does (:mod:`node.blocks.steps`: step-id order, rollback,
inline compute for decode steps, push on, answer). Messages are bounded: the gRPC
maximum is the largest tensor a session may legally send plus a small envelope.

The bounds and channel options both ends share (:class:`ServerLimits`,
:func:`grpc_options`, the message envelope) are in :mod:`node.blocks.wire`; the first two
are re-exported here, as is :class:`StepError`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable

import grpc

from node.blocks.access import SwarmAccess
from node.blocks.block_functions import BlockSpan
from node.blocks.kv_cache import CacheManager
from node.blocks.peer_input import InputChecks, StepError, peer_host
from node.blocks.push import NoPush, PushChannels, PushPolicy
from node.blocks.sessions import LiveSession, SessionTable
from node.blocks.steps import StepRunner
from node.blocks.tls import TlsConfig
from node.blocks.wire import ServerLimits, grpc_options
from proto import blocks_pb2, blocks_pb2_grpc, common_pb2
from proto.codec import TensorLimits, encode_tensor
from proto.records import HardwareInfo

__all__ = ["BlockServicer", "ServerLimits", "StepError", "grpc_options", "start_grpc_server"]

logger = logging.getLogger(__name__)


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
        self.max_length = min(limits.max_length, int(span.config.max_position_embeddings))
        self.tensor_limits = TensorLimits(max_bytes=limits.max_tensor_bytes(span.hidden_size))
        self.inputs = InputChecks(
            model_name=model_name, span_start=span.start, span_end=span.end, hidden_size=span.hidden_size,
            max_batch=limits.max_batch, max_length=self.max_length, tensor_limits=self.tensor_limits,
        )
        self.sessions = SessionTable(caches, max_per_peer=limits.max_sessions_per_peer)
        self.steps = StepRunner(
            span, caches, self.inputs, inline_tokens=limits.inline_tokens, push_policy=push_policy or NoPush(),
            push_channels=push_channels or PushChannels(
                grpc_options(limits.max_message_bytes(span.hidden_size)), timeout_s=limits.push_timeout_s
            ),
        )

    @property
    def push_policy(self) -> PushPolicy:
        """Which peers this node may push to; may be replaced while serving (the next new link obeys it)."""
        return self.steps.push_policy

    @push_policy.setter
    def push_policy(self, policy: PushPolicy) -> None:
        self.steps.push_policy = policy

    @property
    def push_channels(self) -> PushChannels:
        return self.steps.push_channels

    def close(self) -> None:
        self.steps.close()

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
            start, end = self.inputs.check_target(request.model, request.start_block, request.end_block)
            hidden = self.inputs.decode_hidden(request.hidden, batch=None)
            if hidden.shape[1] > self.max_length:
                raise StepError(grpc.StatusCode.INVALID_ARGUMENT, f"{hidden.shape[1]} tokens > {self.max_length}")
        except StepError as exc:
            await context.abort(exc.code, str(exc))
        out = await self.steps.run(hidden, start=start, end=end, position=0, cache=None)
        return blocks_pb2.ForwardResponse(hidden=encode_tensor(out))

    async def Inference(  # type: ignore[override]
        self, request_iterator: AsyncIterator[blocks_pb2.InferenceStep], context: grpc.aio.ServicerContext
    ) -> None:
        live: LiveSession | None = None
        peer = peer_host(context.peer())
        try:
            async for step in request_iterator:
                if live is None:
                    live = self._open(step, context, peer)
                if step.close and not step.HasField("hidden"):
                    break
                async with live.lock:
                    await self.steps.apply(live, step, pushed=False)
                if step.close:
                    break
        except StepError as exc:
            logger.info("session %s: %s %s", live.session_id if live else "?", exc.code.name, exc)
            await context.abort(exc.code, str(exc))
        finally:
            if live is not None:
                self.sessions.end(live, peer)

    async def Push(
        self, request_iterator: AsyncIterator[blocks_pb2.InferenceStep], context: grpc.aio.ServicerContext
    ) -> blocks_pb2.PushReceipt:
        """Steps pushed by the previous hop into sessions open here; each is answered to that session's driver."""
        count = 0
        async for step in request_iterator:
            live = self.sessions.get(step.session_id)
            if live is None:
                await context.abort(grpc.StatusCode.NOT_FOUND, "no such session open here (closed or expired)")
            assert live is not None  # abort raises
            async with live.lock:
                try:
                    await self.steps.apply(live, step, pushed=True)
                except Exception as exc:  # the session's driver hears of it and moves the span
                    reason = f"{exc.code.name}: {exc}" if isinstance(exc, StepError) else f"INTERNAL: {exc!r}"
                    logger.info("session %s: pushed step %d rejected: %s", live.session_id, step.step_id, reason)
                    with contextlib.suppress(Exception):  # the driver's stream may be gone as well
                        await self.steps.answer(live, blocks_pb2.InferenceStepResult(step_id=step.step_id,
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

    def _open(self, step: blocks_pb2.InferenceStep, context: grpc.aio.ServicerContext, peer: str) -> LiveSession:
        """Open the session a stream's first step asks for: the peer's share first, then the step, then the cache."""
        self.sessions.admit(peer)
        start, end, batch = self.inputs.check_opening(step)
        spec = self.span.cache_spec(start, end, batch=batch, max_length=step.max_length)
        return self.sessions.open(step.session_id, spec, start=start, end=end, context=context, peer=peer)


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
