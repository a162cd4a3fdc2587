"""How dinet methods, weight formats and requests map onto vLLM's options (runs without vLLM or a GPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from node.engine import GenerationRequest
from node.engines.vllm_options import (
    NGRAM_MAX,
    NGRAM_MIN,
    VllmConfigError,
    VllmSettings,
    engine_options,
    method_options,
    read_checkpoint_quantization,
    sampling_options,
    served_methods,
    weight_options,
)
from proto.methods import METHODS, get_method

# -- methods -> scheduler options ------------------------------------------------------------


def test_baseline_runs_one_plain_sequence_at_a_time() -> None:
    opts = method_options(get_method("baseline"))
    assert opts.max_num_seqs == 1
    assert not opts.enable_prefix_caching  # explicit: vLLM enables it by default
    assert not opts.enable_chunked_prefill
    assert opts.max_num_batched_tokens is None
    assert opts.speculative_config is None


@pytest.mark.parametrize("name", ["dynamic_batching", "continuous_batching"])
def test_batching_methods_become_vllm_continuous_batching(name: str) -> None:
    opts = method_options(get_method(name))
    assert opts.max_num_seqs == get_method(name).max_batch == 16
    assert not opts.enable_prefix_caching and not opts.enable_chunked_prefill
    assert opts.speculative_config is None


def test_prefix_caching_turns_on_vllm_prefix_caching_only() -> None:
    opts = method_options(get_method("prefix_caching"))
    assert opts.enable_prefix_caching
    assert opts.max_num_seqs == 1 and not opts.enable_chunked_prefill and opts.speculative_config is None


def test_chunked_prefill_uses_the_method_chunk_as_the_step_token_budget() -> None:
    method = get_method("chunked_prefill")
    opts = method_options(method)
    assert opts.enable_chunked_prefill
    assert opts.max_num_batched_tokens == method.prefill_chunk == 128
    assert not opts.enable_prefix_caching


def test_spec_ngram_becomes_vllm_prompt_lookup() -> None:
    method = get_method("spec_ngram")
    assert method_options(method).speculative_config == {
        "method": "ngram",
        "num_speculative_tokens": method.draft_tokens,
        "prompt_lookup_max": NGRAM_MAX,
        "prompt_lookup_min": NGRAM_MIN,
    }


def test_spec_draft_needs_a_draft_model_and_uses_it() -> None:
    with pytest.raises(VllmConfigError, match="--vllm-draft-model"):
        method_options(get_method("spec_draft"))
    opts = method_options(get_method("spec_draft"), draft_model="/models/draft", speculative_tokens=6)
    assert opts.speculative_config == {"method": "draft_model", "model": "/models/draft", "num_speculative_tokens": 6}


def test_all_combines_every_flag_and_budgets_a_step_for_every_speculating_sequence() -> None:
    method = get_method("all")
    opts = method_options(method)
    assert opts.max_num_seqs == 16 and opts.enable_prefix_caching and opts.enable_chunked_prefill
    assert opts.speculative_config is not None and opts.speculative_config["method"] == "ngram"
    # 16 sequences x (1 + 4 proposed tokens) = 80 <= the 128-token chunk
    assert opts.max_num_batched_tokens == max(method.prefill_chunk, 16 * (1 + method.draft_tokens))


def test_every_dinet_method_has_a_mapping() -> None:
    for name, method in METHODS.items():
        opts = method_options(method, draft_model="/models/draft")
        assert opts.max_num_seqs >= 1, name


# -- which methods an engine serves -----------------------------------------------------------


def test_an_engine_built_for_continuous_batching_also_serves_dynamic_batching_and_nothing_else() -> None:
    assert served_methods(VllmSettings(method="continuous_batching")) == ("continuous_batching", "dynamic_batching")
    assert served_methods(VllmSettings(method="dynamic_batching")) == ("dynamic_batching", "continuous_batching")


@pytest.mark.parametrize("name", ["baseline", "prefix_caching", "chunked_prefill", "spec_ngram", "all"])
def test_an_engine_serves_only_its_own_method_when_no_other_maps_the_same(name: str) -> None:
    assert served_methods(VllmSettings(method=name)) == (name,)


def test_spec_draft_is_served_only_with_a_draft_model() -> None:
    with pytest.raises(VllmConfigError):
        VllmSettings(method="spec_draft")
    assert served_methods(VllmSettings(method="spec_draft", draft_model="/m")) == ("spec_draft",)


def test_settings_reject_what_vllm_cannot_run() -> None:
    with pytest.raises(VllmConfigError, match="unknown acceleration method"):
        VllmSettings(method="warp_speed")
    with pytest.raises(VllmConfigError, match="quantization"):
        VllmSettings(quantization="int4")
    with pytest.raises(VllmConfigError, match="memory"):
        VllmSettings(gpu_memory_utilization=1.5)
    with pytest.raises(VllmConfigError, match="speculative tokens"):
        VllmSettings(speculative_tokens=99)


# -- weight formats ---------------------------------------------------------------------------


@pytest.mark.parametrize(("dtype", "fmt"), [("float32", "fp32"), ("bfloat16", "bf16"), ("float16", "fp16")])
def test_plain_weight_formats_are_vllm_dtypes(dtype: str, fmt: str) -> None:
    assert weight_options(dtype, "") == (dtype, None)
    assert VllmSettings().weight_format(dtype) == fmt


def test_int8_needs_an_int8_checkpoint_whose_scheme_vllm_reads_itself() -> None:
    with pytest.raises(VllmConfigError, match="int8-quantized checkpoint"):
        weight_options("float32", "int8")
    assert weight_options("float32", "int8", checkpoint_quantization="compressed-tensors") == ("auto", None)
    assert VllmSettings(quantization="int8").weight_format("float32") == "int8"


def test_fp8_is_quantized_by_vllm_at_load_time_from_16_bit_weights() -> None:
    assert weight_options("bfloat16", "fp8") == ("bfloat16", "fp8")
    with pytest.raises(VllmConfigError, match="--dtype bfloat16"):
        weight_options("float32", "fp8")


def test_a_quantized_checkpoint_is_not_reported_as_full_precision() -> None:
    with pytest.raises(VllmConfigError, match="already quantized"):
        weight_options("bfloat16", "", checkpoint_quantization="compressed-tensors")


def test_checkpoint_quantization_is_read_from_config_json(tmp_path: Path) -> None:
    assert read_checkpoint_quantization(str(tmp_path)) == ""  # no config.json
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert read_checkpoint_quantization(str(tmp_path)) == ""
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "compressed-tensors"}}))
    assert read_checkpoint_quantization(str(tmp_path)) == "compressed-tensors"
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(VllmConfigError, match="cannot read"):
        read_checkpoint_quantization(str(tmp_path))


def test_the_tiny_model_is_an_unquantized_checkpoint(tiny_model_path: Path) -> None:
    assert read_checkpoint_quantization(str(tiny_model_path)) == ""


# -- the whole engine ------------------------------------------------------------------------


def test_engine_kwargs_name_every_option_explicitly_and_leave_out_unset_ones() -> None:
    settings = VllmSettings(method="all", gpu_memory_utilization=0.5, enforce_eager=True, seed=7)
    kwargs = engine_options(settings, model="/models/small", dtype="bfloat16").engine_kwargs()
    assert kwargs == {
        "model": "/models/small",
        "dtype": "bfloat16",
        "max_num_seqs": 16,
        "enable_prefix_caching": True,
        "enable_chunked_prefill": True,
        "max_num_batched_tokens": 128,
        "speculative_config": {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": NGRAM_MAX,
                               "prompt_lookup_min": NGRAM_MIN},
        "gpu_memory_utilization": 0.5,
        "enforce_eager": True,
        "seed": 7,
    }
    plain = engine_options(VllmSettings(method="baseline", max_model_len=512), model="m", dtype="float32")
    kwargs = plain.engine_kwargs()
    assert kwargs["max_model_len"] == 512
    assert not {"quantization", "speculative_config", "max_num_batched_tokens"} & kwargs.keys()


# -- requests -> sampling ---------------------------------------------------------------------


def test_greedy_requests_ignore_top_p_and_seed() -> None:
    request = GenerationRequest(prompt_ids=(1, 2), max_new_tokens=5, temperature=0.0, top_p=0.5, seed=3,
                                eos_token_id=2)
    assert sampling_options(request) == {
        "n": 1, "max_tokens": 5, "temperature": 0.0, "top_p": 1.0,
        "ignore_eos": True, "stop_token_ids": [2], "detokenize": False,
    }


def test_sampled_requests_carry_temperature_top_p_and_seed() -> None:
    request = GenerationRequest(prompt_ids=(1,), max_new_tokens=3, temperature=0.8, top_p=0.9, seed=42)
    opts = sampling_options(request)
    assert (opts["temperature"], opts["top_p"], opts["seed"]) == (0.8, 0.9, 42)
    assert opts["stop_token_ids"] == []  # no EOS given: only max_new_tokens stops it
    unseeded = sampling_options(GenerationRequest(prompt_ids=(1,), max_new_tokens=3, temperature=0.8))
    assert "seed" not in unseeded  # vLLM picks one (the worker derives a seed from the request id first)


def test_requests_outside_the_contract_are_refused() -> None:
    with pytest.raises(ValueError, match="max_new_tokens"):
        sampling_options(GenerationRequest(prompt_ids=(1,), max_new_tokens=0))
    with pytest.raises(ValueError, match="top_p"):
        sampling_options(GenerationRequest(prompt_ids=(1,), max_new_tokens=1, temperature=1.0, top_p=0.0))
    with pytest.raises(ValueError, match="temperature"):
        sampling_options(GenerationRequest(prompt_ids=(1,), max_new_tokens=1, temperature=-1.0))
