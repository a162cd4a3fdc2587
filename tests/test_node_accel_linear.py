"""fp32 linears through oneDNN: same results as ``F.linear`` and as the MKL path, only another kernel.

Stated tolerance: fp32 outputs differ from ``F.linear`` / the MKL-backed block range by at most
1e-4 absolute (summation order only), and greedy generation is token-identical to the whole
transformers model either way (the chain tests check that with oneDNN on, the default).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from node.accel import linear
from node.accel.executor import BlockExecutor, ModelHead, StepItem
from node.accel.linear import OneDnnLinear, onednn_linear_available, use_onednn_linears
from node.accel.weights import apply_weight_format

needs_onednn = pytest.mark.skipif(not onednn_linear_available(), reason="this torch build has no oneDNN linear")
ATOL = 1e-4


@needs_onednn
@pytest.mark.parametrize("rows", [1, 8, 16, 37])
@pytest.mark.parametrize("bias", [False, True])
def test_onednn_linear_matches_f_linear(rows, bias):
    torch.manual_seed(rows)
    plain = nn.Linear(96, 160, bias=bias)
    fast = OneDnnLinear.from_linear(plain)
    x = torch.randn(1, rows, 96)
    with torch.inference_mode():
        got = fast(x)
        want = F.linear(x, plain.weight, plain.bias)
    assert got.shape == (1, rows, 160)
    assert (got - want).abs().max().item() <= ATOL
    assert fast.weight is plain.weight  # shares the parameters: no second copy of the weights


@needs_onednn
def test_only_plain_fp32_linears_are_swapped():
    inner = nn.Sequential(nn.Linear(8, 4))
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), inner)
    assert use_onednn_linears(model) == 2
    assert isinstance(model[0], OneDnnLinear) and isinstance(inner[0], OneDnnLinear)
    bf16 = nn.Sequential(nn.Linear(8, 8)).to(torch.bfloat16)
    assert use_onednn_linears(bf16) == 0
    int8 = apply_weight_format(nn.Sequential(nn.Linear(8, 8)), "int8")
    assert use_onednn_linears(int8) == 0
    assert not any(isinstance(m, OneDnnLinear) for m in int8.modules())
    with pytest.raises(TypeError):
        OneDnnLinear.from_linear(nn.Linear(4, 4).to(torch.bfloat16))


def test_the_switch_turns_onednn_off(monkeypatch):
    monkeypatch.setenv(linear.ENV_SWITCH, "0")
    model = nn.Sequential(nn.Linear(8, 8))
    assert use_onednn_linears(model) == 0
    assert type(model[0]) is nn.Linear


def test_outside_inference_it_falls_back_to_f_linear():
    torch.manual_seed(1)
    plain = nn.Linear(16, 4)
    fast = OneDnnLinear.from_linear(plain)
    x = torch.randn(3, 16, requires_grad=True)
    fast(x).sum().backward()  # autograd works: the grad-enabled path is F.linear
    assert x.grad is not None and x.grad.shape == (3, 16)


def _ragged_forward(executor: BlockExecutor, hiddens: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """Run several steps of a ragged batch (prefill, decode and multi-token items) and collect outputs."""
    caches = [executor.new_cache() for _ in hiddens[0]]
    outs: list[torch.Tensor] = []
    for step in hiddens:
        outs += executor.forward([StepItem(kv, h) for kv, h in zip(caches, step, strict=True)])
    return outs


@needs_onednn
def test_block_range_with_onednn_matches_the_mkl_path_in_fp32(tiny_model_path, monkeypatch):
    fast = BlockExecutor.load(tiny_model_path, 0, 2)
    assert any(isinstance(m, OneDnnLinear) for m in fast.layers.modules())
    monkeypatch.setenv(linear.ENV_SWITCH, "0")
    plain = BlockExecutor.load(tiny_model_path, 0, 2)
    assert not any(isinstance(m, OneDnnLinear) for m in plain.layers.modules())
    torch.manual_seed(2)
    hidden = fast.hidden_size
    steps = [[torch.randn(n, hidden) for n in (9, 1, 4)], [torch.randn(n, hidden) for n in (1, 1, 3)],
             [torch.randn(1, hidden) for _ in range(3)]]
    for got, want in zip(_ragged_forward(fast, steps), _ragged_forward(plain, steps), strict=True):
        assert got.shape == want.shape
        assert (got - want).abs().max().item() <= ATOL


@needs_onednn
def test_model_head_logits_match_with_onednn(tiny_model_path, monkeypatch):
    fast = ModelHead.load(tiny_model_path)
    monkeypatch.setenv(linear.ENV_SWITCH, "0")
    plain = ModelHead.load(tiny_model_path)
    assert isinstance(fast.lm_head, OneDnnLinear) and type(plain.lm_head) is nn.Linear
    hidden = torch.randn(5, fast.config.hidden_size)
    assert (fast.logits(hidden) - plain.logits(hidden)).abs().max().item() <= ATOL
