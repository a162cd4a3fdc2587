"""Loads only what a node needs of a Llama checkpoint: a range of decoder blocks, and
the embeddings / final norm / LM head only for a node that drives requests.

Weights are read tensor by tensor from the safetensors files (``safe_open``), never
through ``from_pretrained`` of the whole model, so a node's resident memory follows its
share of the model. The model is found the way ``from_pretrained`` finds it: a local
directory, or a hub name resolved with ``huggingface_hub.snapshot_download`` (the
``.safetensors`` files it fetches are then read selectively as well).
"""

from __future__ import annotations

import json
import logging
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, PretrainedConfig

from node.accel.linear import onednn_linear, use_onednn_linears

logger = logging.getLogger(__name__)

WEIGHT_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.float32}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
EMBED_KEY = "model.embed_tokens.weight"
NORM_KEY = "model.norm.weight"
HEAD_KEY = "lm_head.weight"


def resolve_model_dir(model_path: str) -> Path:
    """A local directory as is; otherwise a hub name, downloaded (config, tokenizer, safetensors) to the HF cache."""
    path = Path(model_path)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model_path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))


def load_config(model_dir: Path) -> PretrainedConfig:
    config = AutoConfig.from_pretrained(model_dir)
    if config.model_type != "llama":
        raise ValueError(f"{model_dir}: model_type {config.model_type!r} is not supported (only 'llama')")
    config._attn_implementation = "sdpa"  # what from_pretrained picks by default; keeps numerics identical
    return config


def _weight_map(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file that holds it (sharded or single-file checkpoints)."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        mapping = json.loads(index.read_text())["weight_map"]
        return {name: model_dir / file for name, file in mapping.items()}
    single = model_dir / "model.safetensors"
    if not single.exists():
        raise FileNotFoundError(f"{model_dir} has no model.safetensors(.index.json); only safetensors are supported")
    from safetensors import safe_open

    with safe_open(str(single), framework="pt") as f:
        return {name: single for name in f.keys()}  # noqa: SIM118 - safe_open has no __iter__


def read_tensors(model_dir: Path, names: list[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Read exactly ``names`` from the checkpoint (grouped per file), cast to ``dtype``.

    :raises KeyError: naming the tensors the checkpoint lacks.
    """
    from safetensors import safe_open

    wmap = _weight_map(model_dir)
    missing = [n for n in names if n not in wmap]
    if missing:
        raise KeyError(f"checkpoint {model_dir} lacks tensors {missing[:5]}{'...' if len(missing) > 5 else ''}")
    by_file: dict[Path, list[str]] = defaultdict(list)
    for name in names:
        by_file[wmap[name]].append(name)
    out: dict[str, torch.Tensor] = {}
    for file, file_names in by_file.items():
        with safe_open(str(file), framework="pt") as f:
            for name in file_names:
                tensor = f.get_tensor(name)
                # clone() owns fresh memory, so nothing keeps the file mapping alive
                out[name] = tensor.to(dtype).clone() if tensor.dtype != dtype else tensor.clone()
    return out


@dataclass
class DriverParts:
    """What a driver needs besides the blocks: token embeddings, final norm, LM head."""

    embed: nn.Embedding
    norm: nn.Module
    lm_head: nn.Linear

    @torch.inference_mode()
    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:  # [B, T] int64 -> [B, T, H]
        return self.embed(ids)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [B, T, H] -> [B, T, V]
        return self.lm_head(self.norm(hidden))


def load_blocks(
    model_dir: Path, config: PretrainedConfig, start: int, end: int, *, weight_format: str = "fp32"
) -> nn.ModuleList:
    """Decoder layers ``start..end-1`` (their ``layer_idx`` is the global index), in eval mode."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    if not 0 <= start < end <= config.num_hidden_layers:
        raise ValueError(f"block range {start}:{end} outside 0:{config.num_hidden_layers}")
    dtype = WEIGHT_DTYPES[_check_format(weight_format)]
    names = [n for n in _weight_map(model_dir) if (m := _LAYER_RE.match(n)) and start <= int(m.group(1)) < end]
    tensors = read_tensors(model_dir, names, dtype)
    layers = nn.ModuleList()
    for index in range(start, end):
        with torch.device("meta"):
            layer = LlamaDecoderLayer(config, layer_idx=index)  # type: ignore[arg-type]
        prefix = f"model.layers.{index}."
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        layer.load_state_dict(state, strict=True, assign=True)
        layers.append(layer.eval())
    tensors.clear()
    if weight_format == "int8":
        layers = torch.ao.quantization.quantize_dynamic(layers, {nn.Linear}, dtype=torch.qint8)
    use_onednn_linears(layers)  # fp32 GEMMs on CPU through oneDNN, same weights (int8/bf16 left alone)
    logger.info("loaded blocks %d:%d of %s (%s)", start, end, model_dir, weight_format)
    return layers


def load_driver_parts(model_dir: Path, config: PretrainedConfig, *, weight_format: str = "fp32") -> DriverParts:
    """Embeddings, final norm and LM head (tied to the embeddings when the config says so)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    dtype = WEIGHT_DTYPES[_check_format(weight_format)]
    tied = bool(getattr(config, "tie_word_embeddings", False))
    names = [EMBED_KEY, NORM_KEY] + ([] if tied else [HEAD_KEY])
    tensors = read_tensors(model_dir, names, dtype)
    embed = nn.Embedding.from_pretrained(tensors[EMBED_KEY], freeze=True, padding_idx=config.pad_token_id)
    with torch.device("meta"):
        norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
    norm.load_state_dict({"weight": tensors[NORM_KEY]}, assign=True)
    head.load_state_dict({"weight": tensors[EMBED_KEY if tied else HEAD_KEY]}, assign=True)
    return DriverParts(embed=embed.eval(), norm=norm.eval(), lm_head=onednn_linear(head.eval()))


def _check_format(weight_format: str) -> str:
    if weight_format not in WEIGHT_DTYPES:
        raise ValueError(f"unknown weight format {weight_format!r}; choose one of {sorted(WEIGHT_DTYPES)}")
    return weight_format
