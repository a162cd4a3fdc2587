"""Pure compute on a span of Llama decoder blocks: no I/O, no sessions, no wire types.

:func:`run_span` pushes hidden states ``[batch, tokens, hidden]`` through consecutive
decoder layers, optionally against a :class:`~node.blocks.kv_cache.SessionCache`. The
rotary position of token ``t`` of a step is ``position + t`` where ``position`` is the
number of tokens already in the cache, so a span in the middle of the model, a step of
several tokens (prefill, replay, chunked prefill, speculative verification) and a
single decode token all see the positions the whole model would give them.

The stock transformers ``LlamaDecoderLayer`` and ``LlamaRotaryEmbedding`` do the math
(checked numerically against ``LlamaForCausalLM`` in the tests), with attention through
the same SDPA kernel ``from_pretrained`` selects, so greedy output matches
``generate`` token for token.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig

from node.blocks.kv_cache import CacheSpec, SessionCache


@dataclass
class BlockSpan:
    """Decoder layers ``start..end-1`` of a model, loaded in this process."""

    config: PretrainedConfig
    layers: nn.ModuleList  # layers[i] is global block start + i
    start: int
    end: int
    rotary: nn.Module  # LlamaRotaryEmbedding(config): no weights, just inverse frequencies
    dtype: torch.dtype  # activation dtype inside the span

    @classmethod
    def create(
        cls, config: PretrainedConfig, layers: nn.ModuleList, start: int, *, dtype: torch.dtype = torch.float32
    ) -> BlockSpan:
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        rotary = LlamaRotaryEmbedding(config)  # type: ignore[arg-type]
        return cls(config, layers, start, start + len(layers), rotary, dtype)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    def cache_spec(self, start: int, end: int, *, batch: int, max_length: int) -> CacheSpec:
        """The cache a session over blocks ``start..end-1`` of this span needs."""
        heads = int(self.config.num_attention_heads)
        head_dim = int(getattr(self.config, "head_dim", None) or self.hidden_size // heads)
        return CacheSpec(
            first_layer=start,
            num_layers=end - start,
            batch=batch,
            kv_heads=int(self.config.num_key_value_heads),
            head_dim=head_dim,
            max_length=max_length,
            dtype=self.dtype,
        )


def causal_mask(past: int, new: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean mask ``[1, 1, new, past + new]``: token ``t`` of the step sees cache and step tokens up to itself."""
    keys = torch.arange(past + new, device=device)
    queries = torch.arange(past, past + new, device=device)
    return (keys[None, :] <= queries[:, None])[None, None]


@torch.inference_mode()
def run_span(
    span: BlockSpan,
    hidden: torch.Tensor,  # [B, T, H]
    *,
    position: int = 0,
    cache: SessionCache | None = None,
    start: int | None = None,
    end: int | None = None,
) -> torch.Tensor:  # [B, T, H], same dtype as ``hidden``
    """Run blocks ``start..end-1`` (default: the whole span) on ``hidden``.

    :param position: tokens that precede this step (the cache length when ``cache`` is given).
    :param cache: the session's cache; this step's keys/values are appended and committed.
    """
    start = span.start if start is None else start
    end = span.end if end is None else end
    if not span.start <= start < end <= span.end:
        raise ValueError(f"blocks {start}:{end} are not inside the span {span.start}:{span.end}")
    if cache is not None and cache.length != position:
        raise ValueError(f"step position {position} != cache length {cache.length}")
    _, new, _ = hidden.shape
    x = hidden.to(span.dtype)
    position_ids = torch.arange(position, position + new, device=x.device).unsqueeze(0)  # [1, T]
    cos_sin = span.rotary(x, position_ids)
    # None lets SDPA use its causal kernel (first step) or attend to everything (a single new token)
    mask = None if position == 0 or new == 1 or cache is None else causal_mask(position, new, x.device)
    for layer in span.layers[start - span.start : end - span.start]:
        x = layer(
            x,
            attention_mask=mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=cache is not None,
            position_embeddings=cos_sin,
        )
    if cache is not None:
        cache.commit(new)
    return x.to(hidden.dtype)


def measure_throughput(span: BlockSpan, *, steps: int = 8, context: int = 32) -> float:
    """Decode tokens/s of the whole span at batch 1 with ``context`` cached tokens (for DHT records)."""
    spec = span.cache_spec(span.start, span.end, batch=1, max_length=context + steps + 1)
    cache = SessionCache(spec)
    run_span(span, torch.zeros(1, context, span.hidden_size), cache=cache)
    token = torch.zeros(1, 1, span.hidden_size)
    run_span(span, token, position=cache.length, cache=cache)  # warm-up
    begin = time.perf_counter()
    for _ in range(steps):
        run_span(span, token, position=cache.length, cache=cache)
    return steps / max(time.perf_counter() - begin, 1e-9)
