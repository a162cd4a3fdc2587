"""Weight formats a consumer group loads its blocks in: fp32, bf16, or int8 dynamic quantization.

The format belongs to the group (it is how its nodes loaded their weights), not to a request.
bf16 halves the bytes read per token; int8 dynamic quantization (``quantize_dynamic`` on every
``nn.Linear``: int8 weights, activations quantized on the fly) quarters them on CPUs with fast
int8 GEMM. Both are lossy; ``tests/test_node_accel_weights.py`` states and checks the tolerance.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch
from torch import nn

WeightFormat = Literal["fp32", "bf16", "int8"]
WEIGHT_FORMATS: tuple[str, ...] = ("fp32", "bf16", "int8")


def check_weight_format(name: str) -> WeightFormat:
    """:raises ValueError: naming the known formats when ``name`` is not one of them."""
    if name not in WEIGHT_FORMATS:
        raise ValueError(f"unknown weight format {name!r}; choose one of {', '.join(WEIGHT_FORMATS)}")
    return name  # type: ignore[return-value]


def compute_dtype(fmt: WeightFormat) -> torch.dtype:
    """dtype of the activations inside blocks loaded in ``fmt`` (int8 keeps fp32 activations)."""
    return torch.bfloat16 if fmt == "bf16" else torch.float32


def apply_weight_format(module: nn.Module, fmt: str) -> nn.Module:
    """Convert a loaded block range in place (bf16) or by module swap (int8); returns the module to use."""
    fmt = check_weight_format(fmt)
    if fmt == "fp32":
        return module.float()
    if fmt == "bf16":
        return module.to(torch.bfloat16)
    with warnings.catch_warnings():  # torch.ao.quantization is deprecated but still the eager int8 path on CPU
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(module.float(), {nn.Linear}, dtype=torch.qint8, inplace=True)
