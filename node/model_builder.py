"""Builds the small Llama-architecture models that tests, the demo and benchmarks run on.

No model hub is reachable from dinet's machines, so the project makes its own models:
random weights from a fixed seed, saved with ``save_pretrained``, and a byte-level BPE
tokenizer trained offline on a corpus that ships with the package. The result is an
ordinary Hugging Face model directory: every loader in dinet reads it with
``from_pretrained`` exactly as it would read a real checkpoint.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]


@dataclass(frozen=True)
class ModelPreset:
    """Architecture knobs of a preset model."""

    vocab_size: int  # BPE vocabulary size, special tokens included
    hidden_size: int
    num_layers: int  # transformer blocks: the unit nodes shard on
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    max_positions: int
    initializer_range: float  # wider than usual so greedy argmax has clear margins


PRESETS: dict[str, ModelPreset] = {
    # seconds to build, a few MB: for unit and integration tests
    "tiny": ModelPreset(1024, 64, 4, 4, 2, 176, 1024, 0.08),
    # ~100M parameters: for benchmarks
    "small": ModelPreset(8192, 768, 12, 12, 12, 2048, 2048, 0.02),
    # ~5M parameters, the small model's tokenizer (same vocabulary size, same corpus, same BPE
    # training): a draft model for speculative decoding (``spec_draft``) in front of ``small``
    "draft": ModelPreset(8192, 256, 2, 4, 4, 688, 2048, 0.02),
}


def corpus_text() -> str:
    """The tokenizer training corpus shipped with the package (Python stdlib docstrings)."""
    return resources.files("node").joinpath("data/corpus.txt").read_text(encoding="utf-8")


def build_tokenizer(vocab_size: int):  # -> transformers.PreTrainedTokenizerFast
    """Train a byte-level BPE tokenizer offline; deterministic for a given corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus_text().split("\n\n"), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )


def build_model(out_dir: str | Path, preset: str = "tiny", *, seed: int = 0) -> Path:
    """Write a model directory (config, safetensors weights, tokenizer) to ``out_dir``.

    :raises ValueError: for an unknown preset name.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = PRESETS[preset]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(spec.vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_positions,
        initializer_range=spec.initializer_range,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("built %s model (%d parameters) in %s", preset, n_params, out)
    return out
