"""The whole model in this process: an :class:`~node.engine.Engine` over ``transformers``.

Loads any causal LM that ``AutoModelForCausalLM.from_pretrained`` can read (a local
directory or a hub name; nothing is downloaded unless the name is not on disk and the
hub is reachable), prefills the prompt once and then decodes one token at a time from
the KV cache. Next-token choice is :func:`node.sampling.choose_next_token`, shared with
the sharded engine, so both produce the same tokens for the same request and seed.

Every forward pass runs on one dedicated worker thread, never on the event loop, so a
node keeps streaming, acking and heartbeating while it computes. Concurrent requests
interleave token by token on that thread (no batching yet: that is the acceleration
methods' job).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from node.engine import GenerationRequest, wants_tokens
from node.sampling import choose_next_token, make_generator

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WEIGHT_FORMATS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def resolve_device(device: str) -> torch.device:
    """``auto`` picks the first CUDA device when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass
class _Sequence:
    """Decoding state of one request: its KV cache, the last token and its RNG."""

    cache: Any  # transformers Cache object, grows by one position per step
    generator: torch.Generator | None
    last_token: int = -1


class LocalEngine:
    """Generates with a whole ``transformers`` model held in this process.

    :param model: a causal LM in eval mode.
    :param device: where ``model`` lives.
    :note: build it with :meth:`load` (blocking: call it in a thread from async code).
    """

    methods: tuple[str, ...] = ("baseline",)  # acceleration methods this engine really executes

    def __init__(self, model: Any, *, device: torch.device) -> None:
        self._model = model
        self._device = device
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dinet-engine")
        self._closed = False
        config = model.config
        self.max_positions: int = int(getattr(config, "max_position_embeddings", 0) or 0)
        self.weight_format: str = WEIGHT_FORMATS.get(next(model.parameters()).dtype, "fp32")

    @classmethod
    def load(cls, name_or_path: str, *, device: str = "auto", dtype: str = "float32") -> LocalEngine:
        """Load a model with ``from_pretrained`` from a local path or a hub name."""
        from transformers import AutoModelForCausalLM

        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        target = resolve_device(device)
        start = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=DTYPES[dtype])
        model = model.to(target)  # type: ignore[arg-type]
        model.eval()
        if str(target) == "cpu":
            from node.accel.linear import use_onednn_linears

            use_onednn_linears(model)  # fp32 GEMMs through oneDNN: faster on CPU, same weights and results
        n_params = sum(p.numel() for p in model.parameters())
        logger.info(
            "loaded %s (%.1fM parameters, %s) on %s in %.2f s",
            name_or_path, n_params / 1e6, dtype, target, time.perf_counter() - start,
        )
        return cls(model, device=target)

    # -- compute (runs on the engine thread) ---------------------------------------------------
    def _forward(self, input_ids: list[int], cache: Any) -> tuple[torch.Tensor, Any]:
        ids = torch.tensor([input_ids], dtype=torch.long, device=self._device)  # [1, T]
        with torch.inference_mode():
            out = self._model(input_ids=ids, past_key_values=cache, use_cache=True)
        return out.logits[0, -1], out.past_key_values  # [vocab], cache now covering T more positions

    def _prefill(self, request: GenerationRequest) -> tuple[int, _Sequence]:
        logits, cache = self._forward(list(request.prompt_ids), None)
        seq = _Sequence(cache=cache, generator=make_generator(request.seed))
        seq.last_token = choose_next_token(
            logits, temperature=request.temperature, top_p=request.top_p, generator=seq.generator
        )
        return seq.last_token, seq

    def _decode_step(self, request: GenerationRequest, seq: _Sequence) -> int:
        logits, seq.cache = self._forward([seq.last_token], seq.cache)
        seq.last_token = choose_next_token(
            logits, temperature=request.temperature, top_p=request.top_p, generator=seq.generator
        )
        return seq.last_token

    # -- Engine ------------------------------------------------------------------------------
    async def generate(self, request: GenerationRequest) -> AsyncIterator[int]:
        """Yield each new token id as soon as it is chosen; stops after ``max_new_tokens`` or EOS.

        The EOS token itself is yielded (as ``transformers`` ``generate`` returns it).
        :raises ValueError: when the prompt is empty or prompt + new tokens exceed the model's
            positions (the worker validates first; this guards other callers).
        """
        if not wants_tokens(request, self.max_positions, closed=self._closed):
            return
        loop = asyncio.get_running_loop()
        token, seq = await loop.run_in_executor(self._executor, self._prefill, request)
        produced = 1
        yield token
        while produced < request.max_new_tokens and token != request.eos_token_id:
            token = await loop.run_in_executor(self._executor, self._decode_step, request, seq)
            produced += 1
            yield token

    async def close(self) -> None:
        """Stop accepting work and release the engine thread (waits for a running step)."""
        if self._closed:
            return
        self._closed = True
        await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown, True)
