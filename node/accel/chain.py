"""Drives one request through a chain of accelerated block servers, applying the request's method.

The driver holds the embeddings and LM head; each hop holds a block range and the session's KV
cache. Per method:

- baseline / batching methods: ordinary prefill + one token per chain pass; the servers batch
  concurrent sessions' steps (``dinet-method`` metadata tells them whether they may).
- prefix caching: the prompt's block hashes go to every hop; the chain starts at the shortest
  prefix all hops hold, and only the rest of the prompt is prefilled.
- chunked prefill: the prompt goes through in chunks of ``prefill_chunk`` tokens, so the servers
  can interleave other sessions' decode steps between them.
- speculative decoding (greedy requests): ``draft_tokens`` drafts are verified in one chain pass
  of ``k + 1`` tokens; rejected positions are rolled back by the next step's ``position``.

Greedy output is token-identical to the baseline for every lossless method.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

import grpc
import torch

from node.accel.batching import plan_chunks
from node.accel.executor import ModelHead
from node.accel.prefix_cache import prefix_block_hashes
from node.accel.server import MD_METHOD, MD_PREFIX_BLOCK, MD_PREFIX_HASHES, MD_PREFIX_HIT
from node.accel.speculative import Drafter, NgramDrafter, verify_greedy
from node.engine import GenerationRequest
from node.sampling import choose_next_token, make_generator
from proto import blocks_pb2, blocks_pb2_grpc
from proto.codec import decode_tensor, encode_tensor
from proto.methods import AccelerationMethod, get_method

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Hop:
    """One server of the chain and the blocks it runs for us."""

    address: str  # host:port of an accelerated block server
    start: int
    end: int


class ChainStepError(RuntimeError):
    """A hop failed or answered something inconsistent; the session cannot continue."""


class _ChainSession:
    """One request's open Inference streams, one per hop, walked in order for every step."""

    def __init__(self, model: str, hops: Sequence[Hop], calls: list, max_length: int) -> None:
        self.model = model
        self.hops = hops
        self.calls = calls
        self.max_length = max_length

    async def step(self, hidden: torch.Tensor, position: int) -> torch.Tensor:
        """[n, hidden] after ``position`` cached tokens -> [n, hidden] out of the last block."""
        for hop, call in zip(self.hops, self.calls, strict=True):
            await call.write(
                blocks_pb2.InferenceStep(
                    model=self.model,
                    start_block=hop.start,
                    end_block=hop.end,
                    hidden=encode_tensor(hidden.unsqueeze(0)),
                    position=position,
                    max_length=self.max_length,
                )
            )
            reply = await call.read()
            if reply is grpc.aio.EOF:
                raise ChainStepError(f"hop {hop.address} closed the session")
            hidden = decode_tensor(reply.hidden)[0]
            if reply.position != position + hidden.shape[0]:
                raise ChainStepError(f"hop {hop.address} reports cache length {reply.position}")
        return hidden

    async def close(self) -> None:
        for call in self.calls:
            try:
                await call.done_writing()
            except Exception:  # the stream may already be gone; nothing to release on our side
                call.cancel()


class _LogitsBatcher:
    """Applies the LM head to the outputs of concurrent sessions in one matmul.

    With many sessions decoding together, their last-hop replies arrive within a few milliseconds
    of each other; one [sessions, hidden] x [hidden, vocab] product costs little more than one row,
    so the driver's per-token work stops growing with concurrency.
    """

    def __init__(self, head: ModelHead, window_s: float) -> None:
        self.head = head
        self.window_s = window_s
        self.open_sessions = 0
        self._pending: list[tuple[torch.Tensor, asyncio.Future[torch.Tensor]]] = []
        self._timer: asyncio.TimerHandle | None = None

    async def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[n, hidden] -> [n, vocab]."""
        if self.open_sessions <= 1:
            return self.head.logits(hidden)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[torch.Tensor] = loop.create_future()
        self._pending.append((hidden, future))
        if len(self._pending) >= self.open_sessions:
            self._flush()
        elif self._timer is None:
            self._timer = loop.call_later(self.window_s, self._flush)
        return await future

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending, self._pending = self._pending, []
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


class AccelChain:
    """Generation over a fixed chain of hops; implements :class:`node.engine.Engine`."""

    def __init__(
        self,
        *,
        model_name: str,
        head: ModelHead,
        hops: Sequence[Hop],
        prefix_block_tokens: int = 32,
        draft_drafter: Callable[[], Drafter] | None = None,
        max_message_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        if not hops:
            raise ValueError("a chain needs at least one hop")
        num_layers = int(head.config.num_hidden_layers)
        expected = 0
        for hop in hops:
            if hop.start != expected:
                raise ValueError(f"hops must cover blocks 0:{num_layers} contiguously; gap or overlap at {expected}")
            expected = hop.end
        if expected != num_layers:
            raise ValueError(f"hops end at block {expected}, the model has {num_layers}")
        self.model_name = model_name
        self.head = head
        self.hops = list(hops)
        self.prefix_block_tokens = prefix_block_tokens
        self.draft_drafter = draft_drafter  # builds a fresh draft-model drafter per request, if configured
        options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
        ]
        self._logits = _LogitsBatcher(head, window_s=0.003)
        self._channels = [grpc.aio.insecure_channel(hop.address, options=options) for hop in self.hops]
        self._stubs = [blocks_pb2_grpc.BlockServiceStub(ch) for ch in self._channels]

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()

    async def _open(self, method: AccelerationMethod, hashes: list[str], max_length: int) -> tuple[_ChainSession, int]:
        metadata: list[tuple[str, str]] = [(MD_METHOD, method.name)]
        if hashes:
            metadata += [(MD_PREFIX_BLOCK, str(self.prefix_block_tokens)), (MD_PREFIX_HASHES, ",".join(hashes))]
        calls = [stub.Inference(metadata=tuple(metadata)) for stub in self._stubs]
        hit = len(hashes) * self.prefix_block_tokens
        try:
            for call in calls:
                answer = dict(await call.initial_metadata() or ())
                hit = min(hit, int(answer.get(MD_PREFIX_HIT, "0") or 0))
        except Exception:
            for call in calls:
                call.cancel()
            raise
        return _ChainSession(self.model_name, self.hops, calls, max_length), hit

    def _drafter(self, method: AccelerationMethod) -> Drafter | None:
        if method.speculative == "draft":
            if self.draft_drafter is not None:
                return self.draft_drafter()
            logger.warning("method %s asks for a draft model but none is configured; using prompt lookup", method.name)
            return NgramDrafter()
        if method.speculative == "ngram":
            return NgramDrafter()
        return None

    async def generate(self, request: GenerationRequest) -> AsyncIterator[int]:
        """New token ids of ``request``, each as soon as it is known.

        :raises ValueError: for an empty prompt or an unknown method.
        """
        method = get_method(request.method)
        prompt = list(request.prompt_ids)
        if not prompt or request.max_new_tokens < 1:
            raise ValueError("need a non-empty prompt and max_new_tokens >= 1")
        greedy = request.temperature <= 0.0
        drafter = self._drafter(method) if greedy else None
        k = max(0, method.draft_tokens) if drafter is not None else 0
        max_length = len(prompt) + request.max_new_tokens + k + 1
        hashes: list[str] = []
        if method.prefix_caching:  # never the whole prompt: its last token must be computed for logits
            hashes = prefix_block_hashes(prompt, self.prefix_block_tokens)
            hashes = hashes[: (len(prompt) - 1) // self.prefix_block_tokens]
        generator = make_generator(request.seed)
        session, start = await self._open(method, hashes, max_length)
        self._logits.open_sessions += 1
        try:
            out = torch.empty(0)
            for s, e in plan_chunks(len(prompt) - start, method.prefill_chunk):
                out = await session.step(self.head.embed_tokens(prompt[start + s : start + e]), start + s)
            position = len(prompt)  # tokens in every hop's cache
            logits = (await self._logits.logits(out[-1:]))[0]
            token = choose_next_token(logits, temperature=request.temperature, top_p=request.top_p, generator=generator)
            generated = [token]
            yield token
            while len(generated) < request.max_new_tokens and token != request.eos_token_id:
                budget = request.max_new_tokens - len(generated) - 1
                drafts = drafter.propose(prompt + generated, min(k, budget)) if drafter is not None else []
                out = await session.step(self.head.embed_tokens([token, *drafts]), position)
                if drafts:
                    verdict = verify_greedy(drafts, await self._logits.logits(out))
                    new, position = verdict.tokens, position + 1 + verdict.accepted
                else:
                    logits = (await self._logits.logits(out[-1:]))[0]
                    new = [choose_next_token(logits, temperature=request.temperature, top_p=request.top_p,
                                             generator=generator)]
                    position += 1
                for token in new:
                    generated.append(token)
                    yield token
                    if token == request.eos_token_id or len(generated) >= request.max_new_tokens:
                        break
        finally:
            self._logits.open_sessions -= 1
            await session.close()
