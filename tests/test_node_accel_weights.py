"""Weight formats: bf16 and int8 dynamic quantization stay close to fp32.

Stated tolerance: on a fixed set of prompts, the next-token argmax at every position agrees with
fp32 for at least 90% of positions, through the full model split over two block ranges; and greedy
generation over a real chain in that format still runs.
"""

from __future__ import annotations

import pytest
import torch

from node.accel.executor import BlockExecutor, ModelHead, StepItem
from node.accel.weights import apply_weight_format, check_weight_format
from node.engine import GenerationRequest
from tests.helpers_accel import accel_chain, collect

TOP1_AGREEMENT = 0.9
PROMPTS = [list(range(s, s + 24)) for s in (3, 101, 377, 640)] + [[7, 8, 9, 10] * 6, [900 - i for i in range(24)]]


def top1(model_path, weight_format: str) -> torch.Tensor:
    head = ModelHead.load(model_path)
    spans = [BlockExecutor.load(model_path, 0, 2, weight_format=weight_format),
             BlockExecutor.load(model_path, 2, 4, weight_format=weight_format)]
    picks = []
    for prompt in PROMPTS:
        hidden = head.embed_tokens(prompt)
        for span in spans:
            hidden = span.forward([StepItem(span.new_cache(), hidden)])[0]
        picks.append(head.logits(hidden).argmax(dim=-1))
    return torch.cat(picks)


@pytest.mark.parametrize("weight_format", ["bf16", "int8"])
def test_top1_agreement_with_fp32_is_at_least_ninety_percent(tiny_model_path, weight_format):
    reference = top1(tiny_model_path, "fp32")
    agreement = (top1(tiny_model_path, weight_format) == reference).float().mean().item()
    assert agreement >= TOP1_AGREEMENT, f"{weight_format}: top-1 agreement {agreement:.3f}"


def test_formats_really_change_the_weights(tiny_model_path):
    bf16 = BlockExecutor.load(tiny_model_path, 0, 1, weight_format="bf16")
    assert bf16.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    int8 = BlockExecutor.load(tiny_model_path, 0, 1, weight_format="int8")
    assert "quantized" in type(int8.layers[0].mlp.up_proj).__module__
    with pytest.raises(ValueError):
        check_weight_format("fp8")
    with pytest.raises(ValueError):
        apply_weight_format(torch.nn.Linear(2, 2), "int4")


@pytest.mark.parametrize("weight_format", ["bf16", "int8"])
async def test_a_chain_in_a_lossy_format_generates(tiny_model_path, weight_format):
    async with accel_chain(tiny_model_path, weight_format=weight_format) as chain:
        out = await collect(chain.driver, GenerationRequest(prompt_ids=tuple(PROMPTS[0]), max_new_tokens=8,
                                                            method="continuous_batching"))
        assert len(out) == 8 and all(0 <= t < 1024 for t in out)
