"""`dinet-node run --engine vllm`: options are validated, and a machine without vLLM or CUDA gets a clear error."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from node.__main__ import _node_config, build_parser, main
from node.daemon import NodeConfig
from node.engines.vllm_options import VllmSettings


def run_args(tiny_model_path: Path, *extra: str) -> list[str]:
    return ["run", "--model", str(tiny_model_path), "--group", "gpu-vllm", *extra]


def test_vllm_options_reach_the_node_config(tiny_model_path: Path) -> None:
    args = build_parser().parse_args(run_args(
        tiny_model_path, "--engine", "vllm", "--dtype", "bfloat16", "--vllm-method", "spec_ngram",
        "--vllm-quantization", "fp8", "--vllm-speculative-tokens", "6", "--vllm-gpu-memory-utilization", "0.5",
        "--vllm-max-model-len", "256", "--vllm-enforce-eager",
    ))
    config = _node_config(args)
    assert config.engine == "vllm"
    assert config.vllm == VllmSettings(method="spec_ngram", quantization="fp8", speculative_tokens=6,
                                       gpu_memory_utilization=0.5, max_model_len=256, enforce_eager=True)
    assert config.weight_format == "fp8"  # what the node's hardware profile will say


def test_the_local_engine_stays_the_default(tiny_model_path: Path) -> None:
    config = _node_config(build_parser().parse_args(run_args(tiny_model_path)))
    assert config.engine == "local" and config.weight_format == "fp32"


def test_vllm_cannot_be_combined_with_block_serving(tiny_model_path: Path) -> None:
    with pytest.raises(ValueError, match="whole model"):
        NodeConfig(model=str(tiny_model_path), model_name="tiny", group="g", engine="vllm", blocks=(0, 2))
    with pytest.raises(ValueError, match="unknown engine"):
        NodeConfig(model=str(tiny_model_path), model_name="tiny", group="g", engine="tpu")


def test_bad_vllm_settings_exit_2_with_the_reason(tiny_model_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(run_args(tiny_model_path, "--engine", "vllm", "--vllm-method", "spec_draft")) == 2
    assert "--vllm-draft-model" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None and torch.cuda.is_available(),
                    reason="this machine can run vLLM, so there is no error to see")
def test_a_machine_without_vllm_or_cuda_gets_a_clear_error(
    tiny_model_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(run_args(tiny_model_path, "--engine", "vllm")) == 2
    err = capsys.readouterr().err
    expected = "not installed" if importlib.util.find_spec("vllm") is None else "needs a CUDA GPU"
    assert expected in err
    assert "--engine local" in err  # and what to do instead
