"""Client side of ``BlockService``: channels to peers and one open session stream per hop.

:class:`RemoteSpan` is the driver's handle on one session on one peer: each
:meth:`~RemoteSpan.step` writes one message on the bidirectional stream and reads one
reply, under a timeout. Whatever can go wrong with the peer (it died, timed out, is
full, forgot the session, no longer serves the blocks) surfaces as :class:`HopFailure`,
which the chain answers by moving the span to another peer; a request the driver itself
got wrong surfaces as :class:`~proto.errors.InvalidRequestError` and is not retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import grpc
import torch

from node.blocks.access import PeerChannels, SwarmAccess
from node.blocks.push import PushTarget
from node.blocks.routing import Hop
from node.blocks.tls import TlsConfig
from node.blocks.wire import grpc_options
from proto import blocks_pb2, blocks_pb2_grpc
from proto.codec import TensorDecodeError, TensorLimits, decode_tensor, encode_tensor
from proto.errors import InvalidRequestError

logger = logging.getLogger(__name__)
T = TypeVar("T")

# statuses that say "this peer cannot do it", so another peer may
RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.UNAUTHENTICATED,  # refused our swarm token: not a member of our swarm (probes usually tell first)
}
# of those: the peer is gone, serves other blocks, or is of another swarm
DEAD = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAUTHENTICATED}


class HopFailure(Exception):
    """The peer of a hop failed; the span should move to another peer."""

    def __init__(self, hop: Hop, reason: str, *, dead: bool) -> None:
        super().__init__(f"peer {hop.peer_id} at {hop.address} (blocks {hop.start}:{hop.end}): {reason}")
        self.hop = hop
        self.reason = reason
        self.dead = dead  # gone or broken (refused, reset, no longer serving, garbage); else slow or full


class ChannelPool:
    """One gRPC channel per peer address, reused across sessions and requests (TLS ones with ``tls``)."""

    def __init__(self, max_message_bytes: int, *, swarm_token: str = "", tls: TlsConfig | None = None) -> None:
        self.max_message_bytes = max_message_bytes
        # TLS against the swarm CA and the swarm token on every call (node/blocks/access.py)
        self.access = SwarmAccess(swarm_token=swarm_token, tls=tls)
        self.tls = tls
        self._peers = PeerChannels(self.access, grpc_options(max_message_bytes))

    def stub(self, address: str) -> blocks_pb2_grpc.BlockServiceStub:
        """The peer's stub; in a private swarm every call through it carries the token, even from callers
        that pass metadata of their own without it (node/accel's driver, via ``ChainEngine``)."""
        return self._peers.stub(address)

    async def close(self) -> None:
        await self._peers.close()


async def probe_rtt_ms(pool: ChannelPool, hop_address: str, *, timeout_s: float) -> float:
    """Round trip of an ``Info`` call in milliseconds.

    :raises grpc.aio.AioRpcError: when the peer does not answer in time.
    """
    begin = time.perf_counter()
    await pool.stub(hop_address).Info(blocks_pb2.InfoRequest(), timeout=timeout_s)
    return (time.perf_counter() - begin) * 1000.0


@dataclass(frozen=True)
class StepReply:
    """A hop's answer to one step."""

    hidden: torch.Tensor  # [B, T, H] the span's output
    pushed: bool  # the peer also pushed it into the next hop of the route
    push_error: str  # why it did not, when a route was given ("" when it did, or for peers without push)


class RemoteSpan:
    """One inference session on one peer for the blocks of ``hop``.

    :meth:`step` sends a step and reads its answer. In push mode the driver sends only
    to the first hop (:meth:`send` with a ``route``) and :meth:`receive` s every hop's
    answer, since the hops pass the step along among themselves.
    """

    def __init__(
        self,
        pool: ChannelPool,
        hop: Hop,
        *,
        model: str,
        max_length: int,
        step_timeout_s: float,
        tensor_limits: TensorLimits,
    ) -> None:
        self.hop = hop
        self.model = model
        self.max_length = max_length
        self.step_timeout_s = step_timeout_s
        self.tensor_limits = tensor_limits
        self.session_id = uuid.uuid4().hex
        self._call = pool.stub(hop.address).Inference()
        self._opened = False

    def target(self) -> PushTarget:
        """Where another hop pushes into this session."""
        return PushTarget(self.hop.address, self.session_id, self.hop.start, self.hop.end)

    async def step(self, hidden: torch.Tensor, *, position: int, step_id: int = 0) -> torch.Tensor:
        """Send ``hidden`` [B, T, H] as the tokens at ``position``; returns the span's output [B, T, H].

        :raises HopFailure: the peer failed, timed out, or answered nonsense.
        :raises InvalidRequestError: the peer rejected the request itself as malformed.
        """
        await self.send(hidden, position=position, step_id=step_id)
        return (await self.receive(step_id=step_id, position=position, shape=hidden.shape)).hidden

    async def send(
        self, hidden: torch.Tensor, *, position: int, step_id: int = 0, route: Sequence[PushTarget] = ()
    ) -> None:
        """Write one step; with a ``route`` the peer pushes its output on to ``route[0]`` (and so on)."""
        message = blocks_pb2.InferenceStep(hidden=encode_tensor(hidden), position=position, step_id=step_id,
                                           route=[t.to_proto() for t in route])
        if not self._opened:
            message.session_id = self.session_id
            message.model = self.model
            message.start_block = self.hop.start
            message.end_block = self.hop.end
            message.max_length = self.max_length
        await self._guarded(self._call.write(message))
        self._opened = True

    async def receive(self, *, step_id: int, position: int, shape: torch.Size) -> StepReply:
        """The answer to step ``step_id`` (tokens of ``shape`` at ``position``), sent here or pushed from upstream.

        Answers to older steps are skipped: a step the driver carried itself after a failure may
        also have arrived by push before it.
        """
        reply = await self._guarded(self._read(step_id))
        if reply.rejected:
            raise HopFailure(self.hop, f"rejected a pushed step: {reply.rejected}", dead=False)
        if reply.step_id not in (0, step_id):
            raise HopFailure(self.hop, f"answered step {reply.step_id}, expected {step_id}", dead=True)
        try:
            out = decode_tensor(reply.hidden, self.tensor_limits)
        except TensorDecodeError as exc:
            raise HopFailure(self.hop, f"bad tensor in reply: {exc}", dead=True) from None
        if out.shape != shape or reply.position != position + shape[1]:
            raise HopFailure(self.hop, f"reply shape {list(out.shape)} / position {reply.position} does not match",
                             dead=True)
        return StepReply(out, reply.pushed, reply.push_error)

    async def _read(self, step_id: int) -> blocks_pb2.InferenceStepResult:
        while True:
            reply = await self._call.read()
            if reply is grpc.aio.EOF:
                raise self._classify(await self._call.code(), f"stream ended: {await self._call.details()}")
            if not reply.step_id or reply.step_id >= step_id:
                return reply

    async def _guarded(self, io: Awaitable[T]) -> T:
        """``io`` under the step timeout, with every way the stream can fail mapped to HopFailure/InvalidRequest."""
        try:
            async with asyncio.timeout(self.step_timeout_s):  # no extra task per step, unlike wait_for
                return await io
        except TimeoutError:
            self._call.cancel()
            raise HopFailure(self.hop, f"no reply within {self.step_timeout_s:.1f} s", dead=False) from None
        except grpc.aio.AioRpcError as exc:
            raise self._classify(exc.code(), exc.details()) from None
        except (asyncio.InvalidStateError, grpc.aio.UsageError, OSError):  # the stream had already ended
            raise self._classify(await self._call.code(), await self._call.details()) from None

    def _classify(self, code: grpc.StatusCode, details: str | None) -> Exception:
        if code in RETRYABLE:
            return HopFailure(self.hop, f"{code.name}: {details}", dead=code in DEAD)
        return InvalidRequestError(f"peer {self.hop.peer_id} rejected the step: {code.name}: {details}")

    async def close(self) -> None:
        """End the session (the peer frees its cache); never raises."""
        with contextlib.suppress(Exception):
            if self._opened and not self._call.done():
                await asyncio.wait_for(self._call.done_writing(), 1.0)
        self._call.cancel()
