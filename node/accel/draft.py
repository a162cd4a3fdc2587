"""The draft model a driver uses for ``spec_draft``: configured, validated against the served model, loaded once.

Speculative decoding with a draft model only stays lossless if drafts and verification speak the
same token ids, so a draft model is accepted only when its tokenizer is the served model's
(same vocabulary size, same special-token ids, and, when both directories ship a
``tokenizer.json``, the same token-to-id map). The model is loaded once per driver and shared by
every request; each request gets its own :class:`~node.accel.speculative.DraftModelDrafter`
(its own KV cache), so concurrent requests never see each other's drafts.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from node.accel.speculative import Drafter, DraftModelDrafter
from node.accel.weights import apply_weight_format, check_weight_format

logger = logging.getLogger(__name__)


class DraftModelError(ValueError):
    """The configured draft model cannot draft for the served model (missing, or another tokenizer)."""


@dataclass(frozen=True)
class DraftModelConfig:
    """Which draft model a driver holds for ``spec_draft``."""

    model_path: Path  # a local causal-LM directory (config.json + weights), e.g. the ``draft`` preset
    weight_format: str = "fp32"  # fp32 | bf16 | int8: how the driver loads it (cheaper drafts, same checks)

    def __post_init__(self) -> None:
        check_weight_format(self.weight_format)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise DraftModelError(f"{path} is missing") from None
    except (OSError, ValueError) as exc:
        raise DraftModelError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise DraftModelError(f"{path} does not hold a JSON object")
    return data


def _vocab(model_dir: Path) -> dict[str, int] | None:
    """The token-to-id map of ``tokenizer.json`` (None when the directory has no such file)."""
    path = model_dir / "tokenizer.json"
    if not path.exists():
        return None
    vocab = _read_json(path).get("model", {}).get("vocab")
    return vocab if isinstance(vocab, dict) else None


def check_draft_compatible(draft_dir: Path, target_dir: Path) -> None:
    """:raises DraftModelError: when the draft model's token ids do not mean what the served model's mean."""
    draft, target = _read_json(draft_dir / "config.json"), _read_json(target_dir / "config.json")
    for key in ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id"):
        if draft.get(key) != target.get(key):
            raise DraftModelError(
                f"draft model {draft_dir} has {key}={draft.get(key)!r} but the served model has {target.get(key)!r}: "
                "a draft model must share the served model's tokenizer"
            )
    draft_vocab, target_vocab = _vocab(draft_dir), _vocab(target_dir)
    if draft_vocab is not None and target_vocab is not None and draft_vocab != target_vocab:
        raise DraftModelError(f"draft model {draft_dir} and the served model {target_dir} have different tokenizers")


def load_draft_model(config: DraftModelConfig, target_dir: Path) -> Callable[[], Drafter]:
    """Load the draft model once; returns a factory of per-request drafters (for ``AccelChain(draft_drafter=)``).

    :raises DraftModelError: for a missing or incompatible draft model.
    """
    from transformers import AutoModelForCausalLM

    check_draft_compatible(Path(config.model_path), Path(target_dir))
    model = AutoModelForCausalLM.from_pretrained(config.model_path, dtype=torch.float32).eval()
    model = apply_weight_format(model, config.weight_format)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("draft model %s loaded (%d parameters, %s)", config.model_path, n_params, config.weight_format)

    def factory() -> Drafter:
        return DraftModelDrafter(model)

    return factory
