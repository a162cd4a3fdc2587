"""Runs a node's contiguous range of Llama blocks over a ragged batch of sessions in one forward.

Each item is one session's new tokens (a decode step of 1 token, a prefill chunk, or a
speculative verification of k+1 tokens) plus that session's own :class:`SequenceKV`. All new
tokens of all items are flattened into one [1, total_tokens, hidden] tensor, so the weight-bound
parts (q/k/v/o projections, MLP) run once per step for every session together; only attention,
which reads each session's own cache, runs per item. No padding, no cache copies, and each
token carries its own position for the rotary embedding.

Weights are read selectively from the safetensors files: only ``model.layers.{i}.*`` of the
node's range (and the embeddings/norm/head for a driver, :func:`load_head`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from node.accel.kv import SequenceKV
from node.accel.linear import use_onednn_linears
from node.accel.weights import apply_weight_format, check_weight_format, compute_dtype


def _read_tensors(model_path: Path, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Tensors whose names start with one of ``prefixes``, read without loading the rest."""
    from safetensors import safe_open

    files = sorted(model_path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_path}")
    out: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open handles are not iterable)
                if name.startswith(prefixes):
                    out[name] = handle.get_tensor(name)
    return out


def load_config(model_path: str | Path):  # -> transformers.LlamaConfig
    from transformers import LlamaConfig

    path = Path(model_path)
    with open(path / "config.json", encoding="utf-8") as fh:
        raw = json.load(fh)
    if raw.get("model_type") != "llama":
        raise ValueError(f"{path} holds a {raw.get('model_type')!r} model; the block executor supports llama")
    return LlamaConfig.from_pretrained(path)


@dataclass
class StepItem:
    """One session's share of a batched forward."""

    kv: SequenceKV
    hidden: torch.Tensor  # [n_new, hidden] activations entering the node's first block


class BlockExecutor:
    """A loaded block range [start, end) that runs ragged batches of sessions."""

    def __init__(self, config, layers: nn.ModuleList, *, start: int, end: int, weight_format: str) -> None:
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        self.config = config
        self.layers = layers
        self.start = start
        self.end = end
        self.weight_format = check_weight_format(weight_format)
        self.dtype = compute_dtype(self.weight_format)
        self.rotary = LlamaRotaryEmbedding(config=config)
        self.hidden_size: int = config.hidden_size
        self.num_heads: int = config.num_attention_heads
        self.num_kv_heads: int = config.num_key_value_heads
        self.head_dim: int = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    @classmethod
    def load(cls, model_path: str | Path, start: int, end: int, *, weight_format: str = "fp32") -> BlockExecutor:
        """Load blocks [start, end) of the model at ``model_path`` and convert them to ``weight_format``.

        :raises ValueError: for a range outside the model or an unknown format.
        """
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        check_weight_format(weight_format)
        path = Path(model_path)
        config = load_config(path)
        if not 0 <= start < end <= config.num_hidden_layers:
            raise ValueError(f"block range {start}:{end} outside the model's 0:{config.num_hidden_layers}")
        prefixes = tuple(f"model.layers.{i}." for i in range(start, end))
        tensors = _read_tensors(path, prefixes)
        layers = nn.ModuleList()
        for i in range(start, end):
            layer = LlamaDecoderLayer(config, layer_idx=i)
            prefix = f"model.layers.{i}."
            state = {name[len(prefix) :]: t for name, t in tensors.items() if name.startswith(prefix)}
            layer.load_state_dict(state, strict=True)
            layers.append(layer)
        layers.eval()
        layers = apply_weight_format(layers, weight_format)  # type: ignore[assignment]
        use_onednn_linears(layers)  # fp32 only: MKL's small-batch sgemm is the slow part of a decode step
        return cls(config, layers, start=start, end=end, weight_format=weight_format)

    def new_cache(self, capacity: int = 64) -> SequenceKV:
        return SequenceKV(
            num_layers=len(self.layers),
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            dtype=self.dtype,
            capacity=capacity,
        )

    @torch.inference_mode()
    def forward(self, items: Sequence[StepItem]) -> list[torch.Tensor]:
        """Run every item's new tokens through the blocks; returns each item's output [n_new, hidden] (fp32).

        Each item's cache grows by its token count. Items must belong to distinct sessions.
        """
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        if not items:
            return []
        if len({id(item.kv) for item in items}) != len(items):
            raise ValueError("a batch holds two steps of the same session")
        counts = [item.hidden.shape[0] for item in items]
        positions = torch.cat([torch.arange(it.kv.length, it.kv.length + it.hidden.shape[0]) for it in items])
        hidden = torch.cat([item.hidden for item in items]).to(self.dtype).unsqueeze(0)  # [1, N, H]
        cos, sin = self.rotary(hidden, positions.unsqueeze(0))
        total = hidden.shape[1]
        layers: list[Any] = list(self.layers)  # LlamaDecoderLayer (or its int8-quantized twin)
        for li, layer in enumerate(layers):
            attn = layer.self_attn
            x = layer.input_layernorm(hidden)
            q = attn.q_proj(x).view(1, total, self.num_heads, self.head_dim).transpose(1, 2)  # [1, nh, N, d]
            k = attn.k_proj(x).view(1, total, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [1, nkv, N, d]
            v = attn.v_proj(x).view(1, total, self.num_kv_heads, self.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            q, k, v = q.to(self.dtype), k.to(self.dtype), v.to(self.dtype)
            outs = []
            offset = 0
            for item, n in zip(items, counts, strict=True):
                past = item.kv.length
                keys, values = item.kv.append(li, k[0, :, offset : offset + n], v[0, :, offset : offset + n])
                mask = None
                if n > 1:  # query j (absolute past + j) sees keys 0..past + j
                    mask = torch.ones(n, past + n, dtype=torch.bool).tril(diagonal=past)
                out = F.scaled_dot_product_attention(
                    q[:, :, offset : offset + n],
                    keys.unsqueeze(0),
                    values.unsqueeze(0),
                    attn_mask=mask,
                    scale=attn.scaling,
                    enable_gqa=self.num_heads != self.num_kv_heads,
                )  # [1, nh, n, d]
                outs.append(out.transpose(1, 2).reshape(1, n, self.num_heads * self.head_dim))
                offset += n
            attn_out = attn.o_proj(torch.cat(outs, dim=1))
            hidden = hidden + attn_out
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        for item, n in zip(items, counts, strict=True):
            item.kv.advance(n)
        return list(hidden[0].float().split(counts))


class ModelHead(nn.Module):
    """What a driver needs besides the blocks: token embeddings, final norm and LM head."""

    def __init__(self, config, embed: nn.Embedding, norm: nn.Module, lm_head: nn.Linear) -> None:
        super().__init__()
        self.config = config
        self.embed = embed
        self.norm = norm
        self.lm_head = lm_head

    @classmethod
    def load(cls, model_path: str | Path) -> ModelHead:
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        path = Path(model_path)
        config = load_config(path)
        tensors = _read_tensors(path, ("model.embed_tokens.", "model.norm.", "lm_head."))
        embed = nn.Embedding(config.vocab_size, config.hidden_size)
        embed.weight.data.copy_(tensors["model.embed_tokens.weight"])
        norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        norm.weight.data.copy_(tensors["model.norm.weight"])
        lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        head_weight = tensors.get("lm_head.weight", tensors["model.embed_tokens.weight"])  # tied when absent
        lm_head.weight.data.copy_(head_weight)
        head = cls(config, embed, norm, lm_head).eval()
        use_onednn_linears(head)  # the LM head is the driver's biggest matmul
        return head

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @torch.inference_mode()
    def embed_tokens(self, token_ids: Sequence[int]) -> torch.Tensor:
        """[n] token ids -> [n, hidden] fp32 embeddings."""
        return self.embed(torch.tensor(list(token_ids), dtype=torch.long)).float()

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[n, hidden] last-block outputs -> [n, vocab] fp32 logits."""
        return self.lm_head(self.norm(hidden.float())).float()
