"""The driver: generates tokens through a chain of block servers found in the DHT.

:class:`ChainEngine` implements :class:`node.engine.Engine`. For a request it embeds the
prompt, opens a :class:`ChainSession` over the cheapest route (:mod:`node.blocks.routing`),
runs the prefill and then one decode step per token through every hop, applies the final
norm and LM head, and picks each token with :func:`node.sampling.choose_next_token`,
exactly as a whole model in one process would.

Fault tolerance lives in :class:`ChainSession` (:mod:`node.blocks.chain_session`,
re-exported here): it keeps, for each span, every input it sent there. When a hop fails
(the peer died, timed out, is full, forgot the session) the peer is banned for a while, a
new route is found for exactly that span's blocks (one or several peers), the span's past
inputs plus the current one are replayed to them in one step at position 0 (which rebuilds
their caches), and generation continues. The replay is the same computation the failed
peer did, so greedy output stays token-identical. Replacements are bounded per request;
after that the request fails with a typed :class:`~proto.errors.NodeFailureError`. No
route at all raises :class:`~proto.errors.NoRouteError` naming the missing blocks.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from node.blocks.auth import swarm_token_from_env
from node.blocks.chain_session import ChainSession
from node.blocks.loader import DriverParts, load_config, load_driver_parts, resolve_model_dir
from node.blocks.local_span import LocalBlocks, LocalSpan
from node.blocks.peer_view import PeerView, RecordSource
from node.blocks.remote import ChannelPool, RemoteSpan
from node.blocks.routing import Hop, RouteCosts
from node.blocks.tls import TlsConfig
from node.blocks.wire import MESSAGE_ENVELOPE_BYTES
from node.engine import GenerationRequest
from node.sampling import choose_next_token, make_generator
from proto.codec import TensorLimits
from proto.errors import (
    InvalidRequestError,
    MaxNewTokensError,
    PromptEmptyError,
    PromptTooLongError,
)
from proto.methods import METHODS

if TYPE_CHECKING:  # node.accel is imported only when a method needs it
    from node.accel.draft import DraftModelConfig
    from node.accel.speculative import Drafter

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChainConfig:
    """Driver knobs."""

    step_timeout_s: float = 30.0  # a hop must answer one step within this (prefill included)
    max_replacements: int = 4  # hop failures survived per request before NodeFailureError
    ban_s: float = 30.0  # a failed peer is left out of routes this long
    records_max_age_s: float = 2.0  # DHT records are re-read when older (and after any failure)
    route_attempts: int = 3  # DHT reads before a missing span is reported (backing off 0.25 s, 0.5 s)
    probe_timeout_s: float = 3.0  # RTT probe (Info) of a peer not seen before: refused = banned, slow = last resort
    rtt_max_age_s: float = 60.0  # RTTs are re-measured when older
    costs: RouteCosts = field(default_factory=RouteCosts)
    max_message_bytes: int = 64 * 1024 * 1024 + MESSAGE_ENVELOPE_BYTES
    # hops push each step on to the next hop; off by default (star: the driver carries every hop) because
    # it measured no faster on a loaded 2-core loopback and slower on bandwidth-bound links, where each
    # hop's answer to the driver competes with its push (docs/benchmarks.md, "Sharded chain")
    push: bool = False
    # sent on every call (node/blocks/auth.py); default $DINET_SWARM_TOKEN, "" = open swarm
    swarm_token: str = field(default_factory=swarm_token_from_env, repr=False)
    # every channel to a hop (steps, probes, the accel driver's) is TLS, verified against the swarm CA, and only
    # peers whose records say they speak TLS are routed through (node/blocks/tls.py); None = plaintext peers only
    tls: TlsConfig | None = None
    # the draft model spec_draft requests are drafted with (node/accel/draft.py); None = spec_draft not offered
    draft_model: DraftModelConfig | None = None


class ChainEngine:
    """An :class:`~node.engine.Engine` over the swarm's block servers for one model."""

    # every method gives correct output over any server; batching and prefix reuse only pay off
    # on accelerated servers (node/accel), speculative decoding and chunked prefill work everywhere;
    # spec_draft only with a draft model configured (ChainConfig.draft_model), see __init__
    methods: tuple[str, ...] = tuple(name for name in METHODS if name != "spec_draft")

    def __init__(
        self,
        *,
        model_path: str,
        model_name: str,
        records: RecordSource,
        config: ChainConfig | None = None,
        weight_format: str = "fp32",
        local: LocalBlocks | None = None,
    ) -> None:
        self.model_dir = resolve_model_dir(model_path)
        self.model_config = load_config(self.model_dir)
        self.model_name = model_name
        self.config = config or ChainConfig()
        self.weight_format = weight_format
        # the blocks this node serves itself: routed like any peer's, but run in-process (node/blocks/local_span.py)
        self.local = local
        self.num_blocks = int(self.model_config.num_hidden_layers)
        self.max_positions = int(self.model_config.max_position_embeddings)
        self.pool = ChannelPool(self.config.max_message_bytes, swarm_token=self.config.swarm_token,
                                tls=self.config.tls)
        self.tensor_limits = TensorLimits(max_bytes=self.config.max_message_bytes - MESSAGE_ENVELOPE_BYTES)
        self._driver: DriverParts | None = None
        self.peers = PeerView(records, model_name=model_name, num_blocks=self.num_blocks, config=self.config,
                              pool=self.pool, local=local)
        self.sessions: set[ChainSession] = set()  # open sessions (observability: which peers serve what)
        self._drafters: Callable[[], Drafter] | None = None  # the loaded draft model's per-request drafters
        self._draft_lock = asyncio.Lock()
        if self.config.draft_model is not None:
            from node.accel.draft import check_draft_compatible

            # cheap (config and tokenizer files), so a wrong draft model fails at start, not at the first
            # request; the weights are loaded on first use, off the event loop
            check_draft_compatible(Path(self.config.draft_model.model_path), Path(self.model_dir))
            self.methods = tuple(METHODS)

    @property
    def driver(self) -> DriverParts:
        """Embeddings, final norm and LM head, loaded on first use (a pure server never needs them)."""
        if self._driver is None:
            self._driver = load_driver_parts(self.model_dir, self.model_config, weight_format=self.weight_format)
        return self._driver

    # -- Engine -----------------------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncIterator[int]:
        prompt = list(request.prompt_ids)
        self._check_request(prompt, request.max_new_tokens)
        if request.method not in ("", "baseline"):  # acceleration methods: node/accel (docs/methods.md)
            from node.accel.integration import accel_chain_for, generate_with_method

            method = METHODS.get(request.method)  # an unknown name is the accel driver's to reject
            if method is not None and method.speculative == "draft" and self.config.draft_model is not None:
                chain = accel_chain_for(self)
                if chain.draft_drafter is None:
                    chain.draft_drafter = await self.draft_drafters()
            async for token in generate_with_method(self, request):
                yield token
            return
        generator = make_generator(request.seed)
        driver = self.driver
        session = await ChainSession(self, max_length=len(prompt) + request.max_new_tokens).open()
        try:
            hidden = driver.embed_ids(torch.tensor([prompt], dtype=torch.long))
            for produced in range(request.max_new_tokens):
                out = await session.step(hidden)
                logits = driver.logits(out[:, -1:])[0, -1]
                token = choose_next_token(
                    logits, temperature=request.temperature, top_p=request.top_p, generator=generator
                )
                yield token
                if token == request.eos_token_id or produced == request.max_new_tokens - 1:
                    break
                hidden = driver.embed_ids(torch.tensor([[token]], dtype=torch.long))
        finally:
            await session.close()

    async def close(self) -> None:
        await self.pool.close()

    async def draft_drafters(self) -> Callable[[], Drafter]:
        """The configured draft model (loaded once, in a thread) as a factory of per-request drafters.

        :raises ValueError: when no draft model is configured.
        :raises node.accel.draft.DraftModelError: when it can no longer be loaded.
        """
        draft = self.config.draft_model
        if draft is None:
            raise ValueError("no draft model is configured (ChainConfig.draft_model)")
        async with self._draft_lock:
            if self._drafters is None:
                from node.accel.draft import load_draft_model

                self._drafters = await asyncio.to_thread(load_draft_model, draft, Path(self.model_dir))
        return self._drafters

    # -- used by ChainSession ---------------------------------------------------------------------

    async def open_session(self, max_length: int) -> ChainSession:
        """A session over a fresh route (for callers that step hidden states themselves)."""
        return await ChainSession(self, max_length=max_length).open()

    def remote(self, hop: Hop, max_length: int) -> RemoteSpan | LocalSpan:
        """The session handle for ``hop``: in-process when it names this node's own blocks."""
        if self.local is not None and self.local.covers(hop):
            return self.local.open(hop, max_length=max_length)
        return RemoteSpan(
            self.pool, hop, model=self.model_name, max_length=max_length,
            step_timeout_s=self.config.step_timeout_s, tensor_limits=self.tensor_limits,
        )

    async def route(self, start: int, end: int, *, refresh: bool = False) -> list[Hop]:
        """The cheapest live route over blocks ``start..end-1`` (:meth:`PeerView.route`)."""
        return await self.peers.route(start, end, refresh=refresh)

    async def ban(self, hop: Hop, *, dead: bool = True) -> None:
        """Leave the peer out of routes for a while (:meth:`PeerView.ban`)."""
        await self.peers.ban(hop, dead=dead)

    @property
    def records(self) -> RecordSource:
        return self.peers.records

    @records.setter
    def records(self, source: RecordSource) -> None:
        self.peers.records = source

    # -- internals --------------------------------------------------------------------------------

    def _check_request(self, prompt: list[int], max_new_tokens: int) -> None:
        if not prompt:
            raise PromptEmptyError("the prompt has no tokens")
        if max_new_tokens < 1:
            raise MaxNewTokensError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if len(prompt) + max_new_tokens > self.max_positions:
            raise PromptTooLongError(
                f"prompt ({len(prompt)}) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                f"{self.max_positions} positions"
            )
        vocab = int(self.model_config.vocab_size)
        if any(not 0 <= t < vocab for t in prompt):
            raise InvalidRequestError(f"prompt token ids must be in 0..{vocab - 1}")
