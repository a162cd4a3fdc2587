"""One request's open Inference streams along a chain, and the driver-side LM-head batcher.

Split from :mod:`node.accel.chain` so the generation loop there reads as the method logic only.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
import torch

from proto import blocks_pb2
from proto.codec import TensorDecodeError, decode_tensor, encode_tensor

# peer statuses after which another attempt (on a new route) can succeed
RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED, grpc.StatusCode.CANCELLED, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN, grpc.StatusCode.FAILED_PRECONDITION,
}


@dataclass(frozen=True)
class Hop:
    """One server of the chain and the blocks it runs for us."""

    address: str  # host:port of a block server (accelerated or plain)
    start: int
    end: int
    peer_id: str = ""  # DHT identity when the hop came from a route; "" for fixed chains


class Head(Protocol):
    """What the driver needs besides the blocks (:class:`node.accel.executor.ModelHead` or an adapter)."""

    @property
    def num_layers(self) -> int: ...

    def embed_tokens(self, token_ids: Sequence[int]) -> torch.Tensor: ...  # [n] -> [n, hidden]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor: ...  # [n, hidden] -> [n, vocab]


class Parking(Protocol):
    """Counts sessions that wait for a reply (:class:`node.accel.step_gate.StepGate`)."""

    def park(self) -> None: ...

    def unpark(self) -> None: ...


class HopError(RuntimeError):
    """A hop failed or answered something inconsistent; ``retryable`` says whether a new route may help."""

    def __init__(self, hop: Hop, reason: str, *, retryable: bool) -> None:
        super().__init__(f"hop {hop.address} (blocks {hop.start}:{hop.end}): {reason}")
        self.hop = hop
        self.retryable = retryable


class SwarmTokenError(HopError):
    """A hop refused this driver's swarm token (UNAUTHENTICATED): it is missing, wrong, or the hop is of another swarm.

    Not retryable: every member of a swarm wants the same token, so replaying on another route fails the same
    way; the fix is configuration (node/blocks/auth.py).
    """

    def __init__(self, hop: Hop, details: str | None) -> None:
        super().__init__(hop, f"UNAUTHENTICATED: {details}; this driver needs the swarm's token (AccelChain("
                         f"swarm_token=...), ChainConfig.swarm_token, --swarm-token or $DINET_SWARM_TOKEN)",
                         retryable=False)


def status_error(hop: Hop, code: grpc.StatusCode, details: str | None) -> HopError:
    """The error for a hop that ended a call (or a batched step) with ``code``; one mapping for every path."""
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return SwarmTokenError(hop, details)
    return HopError(hop, f"{code.name}: {details}", retryable=code in RETRYABLE)


class ChainSession:
    """Inference streams to every hop, walked in order for every step."""

    def __init__(self, model: str, hops: Sequence[Hop], calls: list[Any], max_length: int, timeout_s: float,
                 logits: LogitsBatcher | None = None, links: Sequence[tuple[Any, int] | None] | None = None,
                 gate: Any = None) -> None:
        self.model = model
        self.hops = list(hops)
        self.calls = calls  # per hop: its Inference stream, or None where the hop is reached through a link
        # per hop: (BatchLink, its stream generation) when the steps go in batched messages (InferenceBatch)
        self.links = list(links) if links is not None else [None] * len(self.hops)
        self.max_length = max_length
        self.timeout_s = timeout_s
        self.session_id = uuid.uuid4().hex
        self.logits = logits  # told while this session waits for the last hop, so it knows whom to wait for
        self.gate = gate if any(link is not None for link in self.links) else None  # StepGate of the links
        self._closed = False
        if self.gate is not None:
            self.gate.session_opened()

    async def step(self, hidden: torch.Tensor, position: int) -> torch.Tensor:
        """[n, hidden] after ``position`` cached tokens -> [n, hidden] out of the last block.

        :raises HopError: naming the hop that failed.
        """
        last = len(self.hops) - 1
        for i, (hop, call, link) in enumerate(zip(self.hops, self.calls, self.links, strict=True)):
            message = blocks_pb2.InferenceStep(
                session_id=self.session_id, model=self.model, start_block=hop.start, end_block=hop.end,
                hidden=encode_tensor(hidden.unsqueeze(0)), position=position, max_length=self.max_length,
            )
            if i == last and self.logits is not None:
                self.logits.awaiting_last_hop += 1
            try:
                if link is not None:  # raises HopError itself
                    reply = await link[0].step(message, link[1])
                else:
                    async with asyncio.timeout(self.timeout_s):
                        await call.write(message)
                        reply = await call.read()
            except TimeoutError:
                raise HopError(hop, f"no reply within {self.timeout_s:.1f} s", retryable=True) from None
            except grpc.aio.AioRpcError as exc:
                raise status_error(hop, exc.code(), exc.details()) from None
            except (grpc.aio.UsageError, asyncio.InvalidStateError, OSError) as exc:
                raise HopError(hop, f"stream unusable: {exc}", retryable=True) from None
            finally:
                if i == last and self.logits is not None:
                    self.logits.awaiting_last_hop -= 1
                    self.logits.poke()  # the sessions already waiting may not need to wait for this one
            if reply is grpc.aio.EOF:
                raise HopError(hop, "closed the session", retryable=True)
            try:
                out = decode_tensor(reply.hidden)
            except TensorDecodeError as exc:
                raise HopError(hop, f"bad tensor in reply: {exc}", retryable=True) from None
            same_shape = out.dim() == 3 and tuple(out.shape[1:]) == tuple(hidden.shape)
            if not same_shape or reply.position != position + len(hidden):
                raise HopError(hop, f"reply {list(out.shape)} at {reply.position} does not match", retryable=True)
            hidden = out[0]
        return hidden

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.gate is not None:
            self.gate.session_closed()
        for link in self.links:
            if link is not None:
                link[0].close_session(self.session_id, link[1])
        for call in self.calls:
            if call is None:
                continue
            try:
                await asyncio.wait_for(call.done_writing(), 1.0)
            except Exception:  # the stream may already be gone; nothing to release on our side
                call.cancel()


class LogitsBatcher:
    """Applies the LM head to the outputs of concurrent sessions in one matmul.

    With many sessions decoding together, their last-hop replies arrive within a few milliseconds
    of each other; one [sessions, hidden] x [hidden, vocab] product costs little more than one row,
    so the driver's per-token work stops growing with concurrency. The batch goes as soon as no
    other session is waiting for the last hop (sessions elsewhere in the chain, e.g. the other
    group of a two-hop pipeline, will not arrive soon), else after ``window_s``.
    """

    def __init__(self, head: Head, window_s: float) -> None:
        self.head = head
        self.window_s = window_s
        self.open_sessions = 0
        self.awaiting_last_hop = 0  # sessions whose step is at the chain's last hop right now
        self._pending: list[tuple[torch.Tensor, asyncio.Future[torch.Tensor]]] = []
        self._parked: dict[int, Parking] = {}  # id(future) -> the gate that counts its waiter as parked
        self._timer: asyncio.TimerHandle | None = None

    async def logits(self, hidden: torch.Tensor, gate: Parking | None = None) -> torch.Tensor:
        """[n, hidden] -> [n, vocab]; while waiting for companions the caller counts as parked on ``gate``."""
        if self.open_sessions <= 1:
            return self.head.logits(hidden)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[torch.Tensor] = loop.create_future()
        self._pending.append((hidden, future))
        if len(self._pending) >= self.open_sessions or self.awaiting_last_hop == 0:
            self._flush()
        else:
            if self._timer is None:
                self._timer = loop.call_later(self.window_s, self._flush)
            if gate is not None:
                self._parked[id(future)] = gate
                gate.park()
        try:
            return await future
        finally:
            self._unpark(future)

    def _unpark(self, future: asyncio.Future[torch.Tensor]) -> None:
        gate = self._parked.pop(id(future), None)
        if gate is not None:
            gate.unpark()

    def poke(self) -> None:
        """A session left the last hop (with a reply or an error): flush if nobody else is coming."""
        if self._pending and self.awaiting_last_hop == 0:
            asyncio.get_running_loop().call_soon(self._flush_if_idle)

    def _flush_if_idle(self) -> None:
        if self.awaiting_last_hop == 0:
            self._flush()

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending, self._pending = self._pending, []
        for _, future in pending:  # their waiters are about to run again
            self._unpark(future)
        live = [(h, f) for h, f in pending if not f.done()]
        if not live:
            return
        try:
            out = self.head.logits(torch.cat([h for h, _ in live]))
        except Exception as exc:  # e.g. out of memory: every waiting session gets the error
            for _, future in live:
                future.set_exception(exc)
            return
        for (_, future), part in zip(live, out.split([h.shape[0] for h, _ in live]), strict=True):
            future.set_result(part)
