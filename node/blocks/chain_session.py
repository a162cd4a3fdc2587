"""A request's fault-tolerant sessions along a route of block servers (used by :class:`ChainEngine`).

:class:`ChainSession` keeps, for each span, every input it sent there. When a hop fails (the
peer died, timed out, is full, forgot the session) the peer is banned for a while, a new route
is found for exactly that span's blocks (one or several peers), the span's past inputs plus the
current one are replayed to them in one step at position 0 (which rebuilds their caches), and
generation continues. The replay is the same computation the failed peer did, so greedy output
stays token-identical. Replacements are bounded per request; after that the request fails with
a typed :class:`~proto.errors.NodeFailureError`.

It lives apart from :mod:`node.blocks.chain_engine` (which re-exports it) because it is the
per-request half of the driver: the engine owns routing, bans and RTTs across requests, the
session only steps one request's hidden states and repairs its own route.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from node.blocks.local_span import LocalSpan
from node.blocks.push import PushTarget
from node.blocks.remote import HopFailure, RemoteSpan
from node.blocks.routing import Hop
from proto.errors import NodeFailureError

if TYPE_CHECKING:  # the engine imports this module; the session only calls back into it
    from node.blocks.chain_engine import ChainEngine

logger = logging.getLogger(__name__)


@dataclass
class _Span:
    """One hop of a live session and what it has been sent so far."""

    hop: Hop
    remote: RemoteSpan | LocalSpan  # LocalSpan: the driver's own blocks, run in its process
    inputs: list[torch.Tensor] = field(default_factory=list)  # every [B, T, H] sent to this span, in order
    length: int = 0  # tokens in the peer's cache (sum of the inputs' T)
    pushes: bool = True  # the peer follows routes (False once it answered one without pushing or saying why)

    def __post_init__(self) -> None:
        self.pushes = self.pushes and not isinstance(self.remote, LocalSpan)

    def record(self, hidden: torch.Tensor) -> None:
        self.inputs.append(hidden)
        self.length += hidden.shape[1]


class ChainSession:
    """One request's sessions along a route; :meth:`step` runs new tokens through all blocks."""

    def __init__(self, engine: ChainEngine, *, max_length: int) -> None:
        self.engine = engine
        self.max_length = max_length
        self.spans: list[_Span] = []
        self.replacements = 0
        self._step_id = 0  # numbers every step the driver writes, on any span (peers apply each once, in order)
        self.carried = 0  # hop steps the driver sent itself (observability, tests)
        self.pushed = 0  # hop steps that reached their hop by a push from the previous one

    async def open(self) -> ChainSession:
        hops = await self.engine.route(0, self.engine.num_blocks)
        self.spans = [_Span(hop, self.engine.remote(hop, self.max_length)) for hop in hops]
        self.engine.sessions.add(self)
        return self

    @property
    def hops(self) -> list[Hop]:
        return [s.hop for s in self.spans]

    async def step(self, hidden: torch.Tensor) -> torch.Tensor:
        """Push ``hidden`` [B, T, H] (the next T tokens' embeddings) through every block.

        Push mode (``ChainConfig.push``): the driver sends the step to the first hop with the
        route of the hops after it, the hops push it along among themselves, and the driver
        only reads each hop's answer (which it keeps as the next hop's input, for replays).
        Wherever a hop did not push (a peer without push, a refused or failed push, the hop
        after a replacement, a session not opened yet) the driver carries the step on itself,
        which is star mode.
        """
        i = 0
        carry = True  # the driver sends span i its input itself
        step_id = 0  # the driver's write that span i's answer belongs to
        while i < len(self.spans):
            span = self.spans[i]
            route = self._route_after(i) if carry else []
            try:
                if carry:
                    step_id = self._next_step_id()
                    await span.remote.send(hidden, position=span.length, step_id=step_id, route=route)
                reply = await span.remote.receive(step_id=step_id, position=span.length, shape=hidden.shape)
            except HopFailure as failure:
                replacement, hidden = await self._replace(i, failure, hidden)
                self.spans[i : i + 1] = replacement
                i += len(replacement)
                carry = True
                continue
            if route and not reply.pushed:
                if reply.push_error:
                    logger.info("hop %s did not push: %s", span.hop.peer_id, reply.push_error)
                else:  # a peer that ignores routes (no push support): stop asking it
                    span.pushes = False
            span.record(hidden)
            if carry:
                self.carried += 1
            else:
                self.pushed += 1
            hidden = reply.hidden
            carry = not reply.pushed
            i += 1
        return hidden

    def _route_after(self, i: int) -> list[PushTarget]:
        """The hops after span ``i`` that a push may reach: up to the first whose session is not open yet."""
        if not self.engine.config.push or not self.spans[i].pushes:
            return []
        route = []
        for span in self.spans[i + 1 :]:
            if span.length == 0 or isinstance(span.remote, LocalSpan):  # in-process spans take no pushes
                break
            route.append(span.remote.target())
        return route

    def _next_step_id(self) -> int:
        self._step_id += 1
        return self._step_id

    async def _replace(self, i: int, failure: HopFailure, current: torch.Tensor) -> tuple[list[_Span], torch.Tensor]:
        """Move span ``i`` to other peers and replay its history plus ``current``; returns the new spans and
        the span's output for ``current``."""
        old = self.spans[i]
        history = old.inputs
        await old.remote.close()
        while True:
            self.replacements += 1
            logger.warning("hop failed (%s); replacement %d of %d", failure, self.replacements,
                           self.engine.config.max_replacements)
            await self.engine.ban(failure.hop, dead=failure.dead)
            if self.replacements > self.engine.config.max_replacements:
                raise NodeFailureError(
                    f"gave up after {self.engine.config.max_replacements} failed hops; last: {failure}. "
                    "The swarm is unstable or overloaded; retry later"
                )
            hops = await self.engine.route(old.hop.start, old.hop.end, refresh=True)
            spans = [_Span(hop, self.engine.remote(hop, self.max_length)) for hop in hops]
            replay = torch.cat([*history, current], dim=1)  # [B, past + T, H]
            try:
                for span in spans:
                    out = await span.remote.step(replay, position=0, step_id=self._next_step_id())
                    span.record(replay)
                    replay = out
            except HopFailure as again:
                failure = again
                for span in spans:
                    await span.remote.close()
                continue
            # each new span's single input covers the history and the current step, so its length is right
            return spans, replay[:, -current.shape[1] :]

    async def close(self) -> None:
        self.engine.sessions.discard(self)
        await asyncio.gather(*(s.remote.close() for s in self.spans))
