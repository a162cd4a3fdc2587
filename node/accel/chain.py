"""Drives one request through a chain of block servers, applying the request's acceleration method.

The driver holds the embeddings and LM head; each hop holds a block range and the session's KV
cache. Per method:

- baseline / batching methods: ordinary prefill + one token per chain pass; accelerated servers
  batch concurrent sessions' steps (``dinet-method`` metadata tells them whether they may).
- prefix caching: the prompt's block hashes go to every hop; the chain starts at the shortest
  prefix all hops hold, and only the rest of the prompt is prefilled.
- chunked prefill: the prompt goes through in chunks of ``prefill_chunk`` tokens, so the servers
  can interleave other sessions' decode steps between them.
- speculative decoding (greedy requests): ``draft_tokens`` drafts are verified in one chain pass
  of ``k + 1`` tokens; rejected positions are rolled back by the next step's ``position``.

Greedy output is token-identical to the baseline for every lossless method. Plain block servers
(:mod:`node.blocks.server`) understand everything except the metadata, so speculative decoding
and chunked prefill work over them too; batching and prefix reuse need accelerated servers.
When a hop fails, the session moves to a new route (``route``), the committed tokens are replayed
to rebuild the caches, and the step is retried: bounded by ``max_restarts``.

Opening a session (channels, batch links, asking the hops for their prefix) is
:mod:`node.accel.chain_opener`'s; the sessions themselves are :mod:`node.accel.chain_session`'s.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from node.accel.batch_link import BatchLink, StepGate
from node.accel.batching import plan_chunks
from node.accel.chain_opener import ChainOpener, RouteFn, StubFn, check_cover
from node.accel.chain_session import ChainSession, Head, Hop, HopError, LogitsBatcher, SwarmTokenError
from node.accel.prefix_cache import prefix_block_hashes
from node.accel.speculative import Drafter, DraftLength, NgramDrafter, verify_greedy
from node.blocks.access import SwarmAccess
from node.blocks.auth import swarm_token_from_env
from node.blocks.tls import TlsConfig
from node.engine import GenerationRequest
from node.sampling import choose_next_token, make_generator
from proto import blocks_pb2_grpc
from proto.methods import AccelerationMethod, get_method

__all__ = ["AccelChain", "Hop", "HopError", "SwarmTokenError"]

logger = logging.getLogger(__name__)


@dataclass
class _Run:
    """The state of one request that survives a change of route."""

    method: AccelerationMethod
    max_length: int
    committed: list[int]  # prompt + generated tokens; the caches hold committed[:position]
    session: ChainSession | None = None
    needs_replay: bool = False
    restarts: int = 0


class AccelChain:
    """Method-aware generation over a chain; implements :class:`node.engine.Engine`."""

    def __init__(
        self,
        *,
        model_name: str,
        head: Head,
        hops: Sequence[Hop] | None = None,
        route: RouteFn | None = None,
        on_hop_failure: Callable[[Hop], Awaitable[None]] | None = None,
        stub_for: StubFn | None = None,
        prefix_block_tokens: int = 32,
        draft_drafter: Callable[[], Drafter] | None = None,
        max_restarts: int = 3,
        step_timeout_s: float = 60.0,
        max_message_bytes: int = 64 * 1024 * 1024,
        prefix_answer_s: float = 0.5,
        batched_steps: bool = True,
        pipeline_groups: int = 0,
        tls: TlsConfig | None = None,
        swarm_token: str | None = None,
    ) -> None:
        """``tls`` and ``swarm_token`` (None = ``$DINET_SWARM_TOKEN``) make the channels it opens without ``stub_for``
        those of a swarm member; ``stub_for``'s owner (``ChainEngine``'s pool) has both, so not with it (ValueError)."""
        if (hops is None) == (route is None):
            raise ValueError("give either a fixed chain (hops) or a route function, not both")
        if stub_for is not None and (tls is not None or swarm_token is not None):
            raise ValueError("with stub_for the stubs carry TLS and the swarm token; do not give tls or swarm_token")
        self.model_name = model_name
        self.head = head
        self.num_layers = head.num_layers
        if hops is not None:
            check_cover(list(hops), self.num_layers)
            fixed = list(hops)

            async def fixed_route() -> list[Hop]:
                return fixed

            route = fixed_route
        self.route: RouteFn = route  # type: ignore[assignment]
        self.on_hop_failure = on_hop_failure
        self.draft_drafter = draft_drafter  # builds a fresh draft-model drafter per request, if configured
        self.max_restarts = max_restarts
        # the channels this driver opens itself (without stub_for): TLS and the token as every member's
        self.access = SwarmAccess(swarm_token=swarm_token_from_env() if swarm_token is None else swarm_token, tls=tls)
        self.tls = tls
        self._logits = LogitsBatcher(head, window_s=0.003)
        self._draft_pool: ThreadPoolExecutor | None = None  # draft-model forwards run here, off the event loop
        # channels, batch links and opening sessions on the route (chain_opener.py)
        self.opener = ChainOpener(
            model_name=model_name, num_layers=self.num_layers, route=self.route, logits=self._logits,
            access=self.access, stub_for=stub_for, max_message_bytes=max_message_bytes,
            prefix_block_tokens=prefix_block_tokens, prefix_answer_s=prefix_answer_s,
            step_timeout_s=step_timeout_s, batched_steps=batched_steps, pipeline_groups=pipeline_groups)
        self._gate = self.opener.gate  # the same object for the driver's life: read per token by _gate_of

    @property
    def _links(self) -> dict[Hop, BatchLink]:
        """The opener's batch links by hop (tests look at them)."""
        return self.opener.links

    def _stub(self, address: str) -> blocks_pb2_grpc.BlockServiceStub:
        """A stub for ``address`` on this driver's channels (scripts/bench/methods.py asks hops for their load)."""
        return self.opener.stub(address)

    async def close(self) -> None:
        await self.opener.close_links()
        if self._draft_pool is not None:
            self._draft_pool.shutdown(wait=False, cancel_futures=True)
            self._draft_pool = None
        await self.opener.close_channels()

    async def _step(self, run: _Run, tokens: list[int], position: int) -> torch.Tensor:
        """One chain pass of ``tokens`` at ``position``, moving to a new route when a hop fails."""
        while True:
            try:
                if run.session is None:
                    run.session, _ = await self.opener.open(run.method, [], run.max_length)
                if run.needs_replay:  # rebuild the new hops' caches from the committed tokens
                    for s, e in plan_chunks(position, run.method.prefill_chunk):
                        await run.session.step(self.head.embed_tokens(run.committed[s:e]), s)
                    run.needs_replay = False
                return await run.session.step(self.head.embed_tokens(tokens), position)
            except HopError as exc:
                link = self.opener.links.get(exc.hop)
                if link is not None and link.unsupported and exc.retryable:  # not a failure: reopen unbatched
                    if run.session is not None:
                        await run.session.close()
                    run.session, run.needs_replay = None, position > 0
                    continue
                if isinstance(exc, SwarmTokenError) and self.on_hop_failure is not None:
                    await self.on_hop_failure(exc.hop)  # a routed driver leaves that peer out from now on
                if not exc.retryable or run.restarts >= self.max_restarts:
                    raise
                run.restarts += 1
                logger.warning("%s; moving the session (restart %d of %d)", exc, run.restarts, self.max_restarts)
                if run.session is not None:
                    await run.session.close()
                run.session, run.needs_replay = None, position > 0
                if self.on_hop_failure is not None:
                    await self.on_hop_failure(exc.hop)

    def _gate_of(self, run: _Run) -> StepGate | None:
        """The gate that counts ``run``'s waits, when its steps go through batch links."""
        return self._gate if run.session is not None and run.session.gate is not None else None

    def _drafter(self, method: AccelerationMethod) -> Drafter | None:
        if method.speculative == "draft":
            if self.draft_drafter is not None:
                return self.draft_drafter()
            logger.warning("method %s asks for a draft model but none is configured; using prompt lookup", method.name)
            return NgramDrafter()
        if method.speculative == "ngram":
            return NgramDrafter()
        return None

    async def _propose(self, drafter: Drafter | None, tokens: list[int], k: int) -> list[int]:
        """Drafts for ``tokens``; a draft model runs in a worker thread so other sessions' replies keep flowing."""
        if drafter is None or k <= 0:
            return []
        if isinstance(drafter, NgramDrafter):  # microseconds: not worth a thread hop
            return drafter.propose(tokens, k)
        if self._draft_pool is None:
            self._draft_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dinet-draft")
        return await asyncio.get_running_loop().run_in_executor(self._draft_pool, drafter.propose, tokens, k)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[int]:
        """New token ids of ``request``, each as soon as it is known.

        :raises ValueError: for an empty prompt or an unknown method.
        :raises HopError: when a hop fails and no new route helps within ``max_restarts``.
        """
        method = get_method(request.method)
        prompt = list(request.prompt_ids)
        if not prompt or request.max_new_tokens < 1:
            raise ValueError("need a non-empty prompt and max_new_tokens >= 1")
        drafter = self._drafter(method) if request.temperature <= 0.0 else None  # speculation is greedy-only
        k = max(0, method.draft_tokens) if drafter is not None else 0
        draft_length = DraftLength(k)
        run = _Run(method=method, max_length=len(prompt) + request.max_new_tokens + draft_length.most + 1,
                   committed=list(prompt))
        hashes: list[str] = []
        if method.prefix_caching:  # never the whole prompt: its last token must be computed for logits
            usable = (len(prompt) - 1) // self.opener.prefix_block_tokens
            hashes = prefix_block_hashes(prompt, self.opener.prefix_block_tokens, max_blocks=usable)
        generator = make_generator(request.seed)

        def pick(logits: torch.Tensor) -> int:
            return choose_next_token(logits, temperature=request.temperature, top_p=request.top_p, generator=generator)

        self._logits.open_sessions += 1
        try:
            start = 0
            try:
                run.session, start = await self.opener.open(method, hashes, run.max_length)
            except HopError as exc:  # the first route failed before anything was sent: _step moves it
                if self.on_hop_failure is not None:
                    await self.on_hop_failure(exc.hop)
                if not exc.retryable:  # our swarm token was refused: no route helps
                    raise
                logger.warning("%s; opening on another route", exc)
            out = torch.empty(0)
            for s, e in plan_chunks(len(prompt) - start, method.prefill_chunk):
                out = await self._step(run, prompt[start + s : start + e], start + s)
            position = len(prompt)  # tokens in every hop's cache
            token = pick((await self._logits.logits(out[-1:], self._gate_of(run)))[0])
            run.committed.append(token)
            generated = 1
            yield token
            while generated < request.max_new_tokens and token != request.eos_token_id:
                budget = request.max_new_tokens - generated - 1
                drafts = await self._propose(drafter, list(run.committed), min(draft_length.now, budget))
                out = await self._step(run, [token, *drafts], position)
                if drafts:
                    verdict = verify_greedy(drafts, await self._logits.logits(out, self._gate_of(run)))
                    draft_length.update(proposed=len(drafts), accepted=verdict.accepted)
                    new, position = verdict.tokens, position + 1 + verdict.accepted
                else:
                    new, position = [pick((await self._logits.logits(out[-1:], self._gate_of(run)))[0])], position + 1
                for token in new:
                    run.committed.append(token)
                    generated += 1
                    yield token
                    if token == request.eos_token_id or generated >= request.max_new_tokens:
                        break
        finally:
            self._logits.open_sessions -= 1
            if run.session is not None:
                await run.session.close()
