"""The driver's own blocks: a hop that runs in the driving node's process instead of over gRPC.

Why. The node that takes a task from its group queue usually serves blocks itself. Routed
like any peer, its own span would be a gRPC call to itself over loopback: encode, write,
wake the server side, decode, check, compute, encode, answer, decode again. The compute is
identical either way, so that trip is pure overhead on every token. Petals' clients hold
no blocks; a dinet driver does, and runs them where they are.

:class:`LocalBlocks` is what the serving side hands its driver: the span's step runner (the
server's own compute path: decode steps inline, larger ones on its compute thread, so the
two never touch the modules at once), the node's cache budget and TTL (a local session is
charged exactly like a remote one, so a full node still refuses, and the driver routes that
span to a replica), and the record routing sees for it. :class:`LocalSpan` has the same
``send``/``receive``/``step``/``close`` contract as :class:`~node.blocks.remote.RemoteSpan`,
so :class:`~node.blocks.chain_session.ChainSession` treats it as one more hop: it records
its inputs for replays, and what the node cannot do (cache full, session expired, a step
out of range) is a :class:`~node.blocks.remote.HopFailure` that moves the span elsewhere.

Limits: a local span never pushes and is never pushed to (push mode carries the steps on
either side of it itself), and only the baseline path uses it: the acceleration methods
(:mod:`node.accel`) batch their steps over gRPC streams and still reach the node through its
server.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import grpc
import torch

from node.blocks.block_functions import BlockSpan
from node.blocks.kv_cache import CacheFullError, CacheManager, SessionCache
from node.blocks.peer_input import StepError, check_position
from node.blocks.push import PushTarget
from node.blocks.remote import HopFailure, StepReply
from node.blocks.routing import Hop
from proto.errors import InvalidRequestError
from proto.records import BlockRecord


class SpanRunner(Protocol):
    """Runs blocks of one span on hidden states (:class:`node.blocks.steps.StepRunner`)."""

    span: BlockSpan

    async def run(
        self, hidden: torch.Tensor, *, start: int, end: int, position: int, cache: SessionCache | None
    ) -> torch.Tensor: ...


@dataclass(frozen=True)
class LocalBlocks:
    """The blocks this node serves, offered to its own driver."""

    steps: SpanRunner  # the server's compute path for its span
    caches: CacheManager  # the server's cache budget, TTL and session limit
    max_length: int  # the longest session the server accepts
    record: Callable[[], BlockRecord]  # how routing sees this span now (peer id, address, throughput, load)

    @property
    def peer_id(self) -> str:
        return self.record().peer_id

    def covers(self, hop: Hop) -> bool:
        """Whether ``hop`` names this node and blocks it holds."""
        span = self.steps.span
        return hop.peer_id == self.peer_id and span.start <= hop.start < hop.end <= span.end

    def open(self, hop: Hop, *, max_length: int) -> LocalSpan:
        return LocalSpan(self, hop, max_length=max_length)


class LocalSpan:
    """One session over this node's own blocks, driven in-process (see the module docstring)."""

    pushes = False  # never pushes on, and cannot be pushed into

    def __init__(self, blocks: LocalBlocks, hop: Hop, *, max_length: int) -> None:
        self.blocks = blocks
        self.hop = hop
        self.max_length = max_length
        self.session_id = f"local-{uuid.uuid4().hex}"
        self._opened = False
        self._reply: tuple[int, StepReply] | None = None  # (step id, answer) of the last send

    def target(self) -> PushTarget:
        raise HopFailure(self.hop, "an in-process span cannot be pushed to", dead=False)

    async def step(self, hidden: torch.Tensor, *, position: int, step_id: int = 0) -> torch.Tensor:
        """Run ``hidden`` [B, T, H] as the tokens at ``position``; returns the span's output [B, T, H].

        :raises HopFailure: the node cannot hold the session (cache full, expired) or the step.
        """
        return await self._compute(hidden, position)

    async def send(
        self, hidden: torch.Tensor, *, position: int, step_id: int = 0, route: Sequence[PushTarget] = ()
    ) -> None:
        """Compute the step now; :meth:`receive` hands the answer over (``route`` is ignored: no pushes)."""
        out = await self._compute(hidden, position)
        self._reply = (step_id, StepReply(out, pushed=False, push_error=""))

    async def receive(self, *, step_id: int, position: int, shape: torch.Size) -> StepReply:
        if self._reply is None or self._reply[0] != step_id:
            raise HopFailure(self.hop, f"no step {step_id} was sent to the in-process span", dead=False)
        reply = self._reply[1]
        self._reply = None
        return reply

    async def close(self) -> None:
        """Free the session's cache; never raises."""
        self.blocks.caches.free(self.session_id)
        self._reply = None

    async def _compute(self, hidden: torch.Tensor, position: int) -> torch.Tensor:
        cache = self._cache(batch=int(hidden.shape[0]))
        try:
            check_position(cache, position, int(hidden.shape[1]))
        except StepError as exc:  # as a remote peer's status would be classified (node.blocks.remote)
            if exc.code == grpc.StatusCode.OUT_OF_RANGE:
                raise InvalidRequestError(f"in-process span rejected the step: {exc}") from None
            raise HopFailure(self.hop, str(exc), dead=False) from None
        return await self.blocks.steps.run(hidden, start=self.hop.start, end=self.hop.end, position=position,
                                           cache=cache)

    def _cache(self, *, batch: int) -> SessionCache:
        caches = self.blocks.caches
        if not self._opened:
            if self.max_length > self.blocks.max_length:
                raise HopFailure(self.hop, f"session of {self.max_length} tokens exceeds this node's "
                                           f"{self.blocks.max_length}", dead=False)
            spec = self.blocks.steps.span.cache_spec(self.hop.start, self.hop.end, batch=batch,
                                                     max_length=self.max_length)
            try:
                cache = caches.allocate(self.session_id, spec)
            except CacheFullError as exc:
                raise HopFailure(self.hop, str(exc), dead=False) from None
            self._opened = True
            return cache
        live = caches.get(self.session_id)
        if live is None:
            raise HopFailure(self.hop, f"session {self.session_id} expired here; replay it", dead=False)
        if live.spec.batch != batch:
            raise HopFailure(self.hop, f"batch {batch} in a session opened for {live.spec.batch}", dead=False)
        return live
