"""Acceleration methods for the DHT-routed chain driver of :mod:`node.blocks.chain_engine`.

:func:`generate_with_method` runs a request's method (``proto.methods``) with the routing, peer
bans, channels and driver weights of a :class:`~node.blocks.chain_engine.ChainEngine`: the route
comes from ``engine.route`` (DHT records, RTTs, load), a failing hop is banned with ``engine.ban``
and the session moves to a new route with its committed tokens replayed. The chain engine calls it
for every request whose method is not the baseline.
"""

from __future__ import annotations

import weakref
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING

import torch

from node.accel.chain import AccelChain
from node.accel.chain_session import Hop, HopError, SwarmTokenError
from node.engine import GenerationRequest
from proto.errors import InvalidRequestError, NodeFailureError

if TYPE_CHECKING:
    from node.blocks.chain_engine import ChainEngine
    from node.blocks.loader import DriverParts

_CHAINS: weakref.WeakKeyDictionary[ChainEngine, AccelChain] = weakref.WeakKeyDictionary()


class DriverPartsHead:
    """Adapts the chain engine's :class:`~node.blocks.loader.DriverParts` to :class:`node.accel.chain_session.Head`."""

    def __init__(self, parts: DriverParts, num_layers: int) -> None:
        self.parts = parts
        self._num_layers = num_layers

    @property
    def num_layers(self) -> int:
        return self._num_layers

    def embed_tokens(self, token_ids: Sequence[int]) -> torch.Tensor:
        return self.parts.embed_ids(torch.tensor([list(token_ids)], dtype=torch.long))[0].float()

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight_dtype = self.parts.lm_head.weight.dtype
        return self.parts.logits(hidden.unsqueeze(0).to(weight_dtype))[0].float()


def accel_chain_for(engine: ChainEngine) -> AccelChain:
    """The method-aware driver that shares ``engine``'s routes, bans, channels and weights (one per engine)."""
    chain = _CHAINS.get(engine)
    if chain is not None:
        return chain
    from node.blocks.routing import Hop as RouteHop

    peers: dict[str, RouteHop] = {}  # address -> the routed hop, to ban the right peer

    async def route() -> list[Hop]:
        hops = await engine.route(0, engine.num_blocks)
        peers.update({h.address: h for h in hops})
        return [Hop(h.address, h.start, h.end, h.peer_id) for h in hops]

    async def on_failure(hop: Hop) -> None:
        routed = peers.get(hop.address)
        if routed is not None:
            await engine.ban(routed)

    chain = AccelChain(
        model_name=engine.model_name,
        head=DriverPartsHead(engine.driver, engine.num_blocks),
        route=route,
        on_hop_failure=on_failure,
        stub_for=engine.pool.stub,
        max_restarts=engine.config.max_replacements,
        step_timeout_s=engine.config.step_timeout_s,
    )
    _CHAINS[engine] = chain
    return chain


async def generate_with_method(engine: ChainEngine, request: GenerationRequest) -> AsyncIterator[int]:
    """Tokens of ``request`` generated with its acceleration method over ``engine``'s swarm.

    :raises NodeFailureError: hops kept failing beyond the engine's ``max_replacements``, or one refused the
        engine's swarm token (that peer is banned).
    :raises InvalidRequestError: a peer rejected the request itself (not retried).
    """
    try:
        async for token in accel_chain_for(engine).generate(request):
            yield token
    except SwarmTokenError as exc:  # a peer of another swarm (our probes passed): banned now, a retry avoids it
        raise NodeFailureError(str(exc)) from None
    except HopError as exc:
        if exc.retryable:
            raise NodeFailureError(f"{exc}; gave up after {engine.config.max_replacements} new routes") from None
        raise InvalidRequestError(f"a peer rejected the request: {exc}") from None
