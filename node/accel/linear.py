"""fp32 linear layers through oneDNN instead of the default BLAS, where that is faster.

On CPU, ``F.linear`` in fp32 goes to MKL's sgemm. On the AMD EPYC hosts we benchmark on, that is
the slow part of a batched decode step: a node's 6 ``small`` blocks take ~19 ms of GEMM at 8
tokens and ~10.6 ms at 1 token, while the same GEMMs through oneDNN (the kernels torch already
uses for bf16) take ~11.5 ms and ~6.7 ms on one thread (see the issue-6 continuous batching section
of ``docs/benchmarks.md``). MKL's small-M kernels do not reach the core's AVX-512 throughput here;
oneDNN's do. The weights stay ordinary fp32 tensors (no repacked copy), so memory, state dicts and
every other reader of ``.weight`` are unchanged; only the kernel differs, with fp32 results equal
to ``F.linear`` up to summation order.

The oneDNN entry point (``torch.ops.mkldnn._linear_pointwise``) is a private torch op, so it is
used only after a self-check against ``F.linear`` succeeds, and ``DINET_ONEDNN_LINEAR=0`` turns
it off (an A/B switch, and an escape hatch should a torch upgrade change the op).
"""

from __future__ import annotations

import functools
import os
from typing import TypeGuard

import torch
import torch.nn.functional as F
from torch import nn

ENV_SWITCH = "DINET_ONEDNN_LINEAR"


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@functools.cache
def onednn_linear_available() -> bool:
    """Whether this torch build runs fp32 linears through oneDNN, checked once against ``F.linear``."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(3, 2, 16, generator=gen)
        w = torch.randn(8, 16, generator=gen)
        b = torch.randn(8, generator=gen)
        with torch.inference_mode():
            got = _onednn_linear(x, w, b)
            want = F.linear(x, w, b)
        return got.shape == want.shape and torch.allclose(got, want, rtol=1e-4, atol=1e-5)
    except (RuntimeError, AttributeError):  # op missing or unsupported in this build
        return False


def onednn_linear_enabled() -> bool:
    """oneDNN linears are used when available and not switched off with ``DINET_ONEDNN_LINEAR=0``."""
    return os.environ.get(ENV_SWITCH, "1") != "0" and onednn_linear_available()


class OneDnnLinear(nn.Linear):
    """An fp32 ``nn.Linear`` whose forward runs through oneDNN; shares its parameters with the original."""

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> OneDnnLinear:
        if type(linear) is not nn.Linear or linear.weight.dtype != torch.float32:
            raise TypeError(f"only plain fp32 nn.Linear can run through oneDNN, got {type(linear).__name__} "
                            f"with {linear.weight.dtype} weights")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features = linear.in_features
        new.out_features = linear.out_features
        new.weight = linear.weight
        new.bias = linear.bias
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or x.device.type != "cpu" or torch.is_grad_enabled():
            return F.linear(x, self.weight, self.bias)  # oneDNN's op here is inference-only, fp32, CPU
        return _onednn_linear(x, self.weight, self.bias)


def _swappable(linear: nn.Module) -> TypeGuard[nn.Linear]:
    return type(linear) is nn.Linear and linear.weight.dtype == torch.float32 and linear.weight.device.type == "cpu"


def onednn_linear(linear: nn.Linear) -> nn.Linear:
    """``linear`` itself, or its :class:`OneDnnLinear` twin when it is a plain fp32 CPU linear and oneDNN is on."""
    if onednn_linear_enabled() and _swappable(linear):
        return OneDnnLinear.from_linear(linear).train(linear.training)
    return linear


def use_onednn_linears(module: nn.Module) -> int:
    """Swap every plain fp32 CPU ``nn.Linear`` inside ``module`` for :class:`OneDnnLinear`, in place.

    Quantized or bf16 linears are left alone (bf16 already runs through oneDNN; int8 has its own
    kernels). Returns how many were swapped; 0 when oneDNN linears are unavailable or switched off.
    """
    if not onednn_linear_enabled():
        return 0
    swapped = 0
    for parent in module.modules():
        for name, child in list(parent.named_children()):
            if _swappable(child):
                setattr(parent, name, OneDnnLinear.from_linear(child).train(child.training))
                swapped += 1
    return swapped
