"""How a dinet method, a weight format and a request become vLLM options (pure; no vLLM import).

vLLM decides batching, prefix caching, chunked prefill, speculative decoding and the weight
format once, when the engine is built, not per request. So a ``--engine vllm`` node is
configured for one dinet method (``--vllm-method``), and it *serves* exactly the methods whose
vLLM options are the same as that one's (:func:`served_methods`): ``dynamic_batching`` and
``continuous_batching`` map to the same options, for instance, so a node built for either serves
both. The worker runs every other method as the engine's own and names that method in the
result and the timing report, and the broker should not offer the others to the node's group
(see docs/node-worker.md, "Engines").

Everything here is a pure function of its arguments, so it is unit-tested on machines without
vLLM or a GPU; :mod:`node.engines.vllm_engine` hands the results to vLLM.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node.engine import GenerationRequest
from proto.methods import METHODS, AccelerationMethod, get_method

DEFAULT_VLLM_METHOD = "continuous_batching"  # vLLM always batches continuously; this names it honestly
QUANTIZATIONS = ("", "int8", "fp8")  # "" = the checkpoint's own dtype (--dtype)
WEIGHT_FORMAT_OF_DTYPE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
NGRAM_MAX = 3  # prompt lookup: longest n-gram matched (as node/accel's prompt lookup)
NGRAM_MIN = 1  # shortest n-gram matched
MAX_SPECULATIVE_TOKENS = 16


class VllmConfigError(ValueError):
    """A method, weight format or setting that vLLM cannot run as asked; the message says what to change."""


@dataclass(frozen=True)
class SchedulingOptions:
    """The per-engine vLLM options that a dinet *method* decides."""

    max_num_seqs: int  # sequences decoded together (1 = one request at a time)
    enable_prefix_caching: bool  # reuse KV blocks of shared prompt prefixes
    enable_chunked_prefill: bool  # split long prefills and mix them with other sequences' decodes
    max_num_batched_tokens: int | None  # tokens per engine step (the prefill chunk); None = vLLM's default
    speculative: tuple[tuple[str, Any], ...] = ()  # vLLM speculative_config as sorted pairs; () = off

    @property
    def speculative_config(self) -> dict[str, Any] | None:
        return dict(self.speculative) or None


@dataclass(frozen=True)
class VllmSettings:
    """The ``--vllm-*`` options of ``dinet-node run --engine vllm``."""

    method: str = DEFAULT_VLLM_METHOD  # the dinet method the engine is built for
    quantization: str = ""  # "" | "int8" (an int8 checkpoint) | "fp8" (vLLM quantizes at load time)
    draft_model: str = ""  # draft model path or name, needed by spec_draft
    speculative_tokens: int = 0  # tokens proposed per step; 0 = the method's draft_tokens
    gpu_memory_utilization: float = 0.9  # share of the GPU's memory vLLM may take (weights + KV cache)
    max_model_len: int = 0  # context length; 0 = the model's own
    enforce_eager: bool = False  # no CUDA graphs: slower, but starts faster and uses less memory
    seed: int = 0  # engine seed (requests with their own seed do not depend on it)

    def __post_init__(self) -> None:
        try:
            get_method(self.method)
        except ValueError as exc:
            raise VllmConfigError(str(exc)) from None
        if self.quantization not in QUANTIZATIONS:
            raise VllmConfigError(
                f"unknown vLLM quantization {self.quantization!r}; choose one of: none, int8, fp8"
            )
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise VllmConfigError(f"gpu memory utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.max_model_len < 0:
            raise VllmConfigError(f"max model length must be >= 0, got {self.max_model_len}")
        if not 0 <= self.speculative_tokens <= MAX_SPECULATIVE_TOKENS:
            raise VllmConfigError(
                f"speculative tokens must be in [0, {MAX_SPECULATIVE_TOKENS}], got {self.speculative_tokens}"
            )
        self.scheduling()  # a method that cannot be built (spec_draft without a draft model) fails here

    def scheduling(self, method: str | None = None) -> SchedulingOptions:
        """The scheduling options of ``method`` (default: the configured one) with these settings."""
        return method_options(
            get_method(method or self.method), draft_model=self.draft_model, speculative_tokens=self.speculative_tokens
        )

    def weight_format(self, dtype: str) -> str:
        """The weight format this node reports (hardware embedding, telemetry)."""
        return self.quantization or WEIGHT_FORMAT_OF_DTYPE.get(dtype, dtype)


def method_options(
    method: AccelerationMethod, *, draft_model: str = "", speculative_tokens: int = 0
) -> SchedulingOptions:
    """Map a dinet method onto vLLM's scheduler and speculative options.

    The mapping is literal: a method gets exactly its own flags, so ``prefix_caching`` alone runs
    one sequence at a time, as it does on a CPU chain, and ``all`` combines them.

    - ``max_batch`` -> ``max_num_seqs``. vLLM has no batching window, so ``dynamic_batching``
      (collect for T ms) and ``continuous_batching`` both become vLLM's continuous batching.
    - ``prefix_caching`` -> ``enable_prefix_caching`` (set explicitly either way: vLLM turns it
      on by default).
    - ``prefill_chunk`` -> ``enable_chunked_prefill`` with ``max_num_batched_tokens`` = the
      chunk, raised where needed so that every running sequence's decode (and speculative
      tokens) fits in one step. Without it vLLM keeps its default token budget; note that
      vLLM's V1 engine has been reported to chunk a prompt longer than that budget even with
      chunked prefill off (vllm-project/vllm#18547), so "off" means "whole up to the budget".
    - ``speculative="ngram"`` -> vLLM's prompt lookup (``method="ngram"``);
      ``speculative="draft"`` -> ``method="draft_model"`` with ``draft_model``.

    :raises VllmConfigError: ``spec_draft`` without a draft model, or an unknown speculative kind.
    """
    max_num_seqs = max(1, method.max_batch)
    tokens = speculative_tokens or method.draft_tokens
    speculative: tuple[tuple[str, Any], ...] = ()
    if method.speculative == "ngram":
        speculative = tuple(sorted({
            "method": "ngram",
            "num_speculative_tokens": tokens,
            "prompt_lookup_max": NGRAM_MAX,
            "prompt_lookup_min": NGRAM_MIN,
        }.items()))
    elif method.speculative == "draft":
        if not draft_model:
            raise VllmConfigError(
                f"method {method.name!r} drafts with a small model; pass --vllm-draft-model PATH "
                "(a model with the same tokenizer), or choose spec_ngram"
            )
        speculative = tuple(sorted({
            "method": "draft_model",
            "model": draft_model,
            "num_speculative_tokens": tokens,
        }.items()))
    elif method.speculative:
        raise VllmConfigError(f"method {method.name!r}: unknown speculative kind {method.speculative!r}")
    if tokens < 1 and speculative:
        raise VllmConfigError(f"method {method.name!r} needs at least one speculative token")
    chunked = method.prefill_chunk > 0
    budget: int | None = None
    if chunked:
        per_step = 1 + (tokens if speculative else 0)  # tokens one decoding sequence needs per step
        budget = max(method.prefill_chunk, max_num_seqs * per_step)
    return SchedulingOptions(
        max_num_seqs=max_num_seqs,
        enable_prefix_caching=method.prefix_caching,
        enable_chunked_prefill=chunked,
        max_num_batched_tokens=budget,
        speculative=speculative,
    )


def served_methods(settings: VllmSettings) -> tuple[str, ...]:
    """The dinet methods an engine built with ``settings`` really executes; the configured one first.

    A method is served when its vLLM options are identical to the configured method's, since
    the engine cannot change them per request.
    """
    own = settings.scheduling()
    served = [settings.method]
    for name in METHODS:
        if name == settings.method:
            continue
        try:
            if settings.scheduling(name) == own:
                served.append(name)
        except VllmConfigError:  # e.g. spec_draft without a draft model: not this engine's
            continue
    return tuple(served)


def weight_options(dtype: str, quantization: str, checkpoint_quantization: str = "") -> tuple[str, str | None]:
    """Map a weight format onto vLLM's ``(dtype, quantization)``.

    - ``""``: the checkpoint's weights in ``dtype`` (float32, bfloat16, float16).
    - ``"int8"``: an already-quantized int8 checkpoint (e.g. W8A8 made with llm-compressor). vLLM
      reads the scheme from the checkpoint's ``quantization_config``; dtype ``auto``. vLLM has no
      int8 quantization at load time, so an unquantized checkpoint is refused.
    - ``"fp8"``: vLLM's dynamic quantization at load time (no calibration data), from a bfloat16
      or float16 checkpoint. This is the GPU's 8-bit format; the CPU groups' int8 is a different one.

    :param checkpoint_quantization: the checkpoint's ``quantization_config.quant_method`` ("" = none).
    :raises VllmConfigError: the combination cannot be served as asked.
    """
    if dtype not in WEIGHT_FORMAT_OF_DTYPE:
        raise VllmConfigError(f"unknown dtype {dtype!r}; choose one of {', '.join(WEIGHT_FORMAT_OF_DTYPE)}")
    if quantization not in QUANTIZATIONS:
        raise VllmConfigError(f"unknown vLLM quantization {quantization!r}; choose one of: none, int8, fp8")
    if quantization == "int8":
        if not checkpoint_quantization:
            raise VllmConfigError(
                "--vllm-quantization int8 needs an int8-quantized checkpoint (vLLM cannot quantize to int8 "
                "while loading); quantize it first (e.g. llm-compressor W8A8), or use fp8 on a GPU that has it"
            )
        return "auto", None
    if checkpoint_quantization:
        raise VllmConfigError(
            f"the checkpoint is already quantized ({checkpoint_quantization}); serve it with "
            "--vllm-quantization int8 so the node reports its weight format truthfully"
        )
    if quantization == "fp8":
        if dtype == "float32":
            raise VllmConfigError("fp8 quantization starts from 16-bit weights; add --dtype bfloat16 (or float16)")
        return dtype, "fp8"
    return dtype, None


def read_checkpoint_quantization(model: str) -> str:
    """``quantization_config.quant_method`` of a local checkpoint ("" when none, or not a local directory)."""
    config_path = Path(model) / "config.json"
    if not config_path.is_file():
        return ""
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise VllmConfigError(f"cannot read {config_path}: {exc}") from exc
    quant = config.get("quantization_config") if isinstance(config, dict) else None
    if not isinstance(quant, dict):
        return ""
    return str(quant.get("quant_method") or "unknown")


@dataclass(frozen=True)
class VllmEngineOptions:
    """Everything vLLM's engine is built with; :meth:`engine_kwargs` feeds ``AsyncEngineArgs``."""

    model: str
    dtype: str
    quantization: str | None
    scheduling: SchedulingOptions
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None
    enforce_eager: bool = False
    seed: int = 0

    def engine_kwargs(self) -> dict[str, Any]:
        s = self.scheduling
        kwargs: dict[str, Any] = {
            "model": self.model,
            "dtype": self.dtype,
            "max_num_seqs": s.max_num_seqs,
            "enable_prefix_caching": s.enable_prefix_caching,
            "enable_chunked_prefill": s.enable_chunked_prefill,
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "enforce_eager": self.enforce_eager,
            "seed": self.seed,
        }
        optional = {
            "quantization": self.quantization,
            "max_num_batched_tokens": s.max_num_batched_tokens,
            "speculative_config": s.speculative_config,
            "max_model_len": self.max_model_len,
        }
        kwargs.update({k: v for k, v in optional.items() if v is not None})
        return kwargs


def engine_options(
    settings: VllmSettings, *, model: str, dtype: str, checkpoint_quantization: str = ""
) -> VllmEngineOptions:
    """The complete engine options of a ``--engine vllm`` node (pure: the caller reads the checkpoint).

    :raises VllmConfigError: see :func:`weight_options` and :func:`method_options`.
    """
    vllm_dtype, quantization = weight_options(dtype, settings.quantization, checkpoint_quantization)
    return VllmEngineOptions(
        model=model,
        dtype=vllm_dtype,
        quantization=quantization,
        scheduling=settings.scheduling(),
        gpu_memory_utilization=settings.gpu_memory_utilization,
        max_model_len=settings.max_model_len or None,
        enforce_eager=settings.enforce_eager,
        seed=settings.seed,
    )


def sampling_options(request: GenerationRequest) -> dict[str, Any]:
    """``SamplingParams`` keyword arguments for one request, with dinet's stopping rules.

    - temperature 0 is greedy (top-p is then 1 and no seed is passed);
    - a seed makes sampling reproducible on the same engine build;
    - the request stops at ``max_new_tokens`` or right after its own ``eos_token_id``, which is
      returned, as the local engine does; vLLM's own EOS handling is switched off
      (``ignore_eos``) so the model's generation config cannot add other stop tokens;
    - vLLM does not detokenize: the worker does, incrementally.

    :raises ValueError: a request the Engine contract does not allow.
    """
    if request.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {request.max_new_tokens}")
    if request.temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {request.temperature}")
    if not 0.0 < request.top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {request.top_p}")
    greedy = request.temperature == 0
    options: dict[str, Any] = {
        "n": 1,
        "max_tokens": request.max_new_tokens,
        "temperature": 0.0 if greedy else request.temperature,
        "top_p": 1.0 if greedy else request.top_p,
        "ignore_eos": True,
        "stop_token_ids": [] if request.eos_token_id is None else [request.eos_token_id],
        "detokenize": False,
    }
    if not greedy and request.seed is not None:  # left out otherwise: vLLM versions differ on seed=None
        options["seed"] = request.seed
    return options
