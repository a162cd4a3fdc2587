"""A whole model on a GPU with vLLM's async engine: an :class:`~node.engine.Engine` for ``--engine vllm``.

vLLM schedules every request it holds in one continuous batch and streams each one's new
tokens; this class only translates. A :class:`~node.engine.GenerationRequest` becomes a token
prompt plus ``SamplingParams`` (:func:`node.engines.vllm_options.sampling_options`), and each
delta vLLM returns becomes the ids it holds, yielded one by one. With speculative decoding one
step can return several tokens. Closing the generator (the worker does when a deadline passes
or a task is cancelled) closes vLLM's stream, which aborts the request inside vLLM and frees
its KV cache.

The engine's options (batching, prefix caching, chunked prefill, speculative decoding,
quantization) are fixed when it is built, so :attr:`VllmEngine.methods` lists the dinet methods
this build really runs (:func:`node.engines.vllm_options.served_methods`).

Unverified on hardware: no GPU was available where this was written. The option mapping and
this translation layer (against a stand-in with vLLM's output shape) are unit-tested;
``tests/test_node_vllm_gpu.py`` checks the real engine end to end and skips without a GPU.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from node.engine import GenerationRequest, wants_tokens
from node.engines.vllm_options import (
    VllmEngineOptions,
    VllmSettings,
    engine_options,
    read_checkpoint_quantization,
    sampling_options,
    served_methods,
)
from node.engines.vllm_runtime import require_vllm

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class VllmApi:
    """The vLLM constructors one request needs, kept apart so the translation is testable without vLLM."""

    sampling_params: Callable[..., Any]  # vllm.SamplingParams
    tokens_prompt: Callable[..., Any]  # vllm.TokensPrompt
    delta_kind: Any  # vllm.sampling_params.RequestOutputKind.DELTA: each output holds only new tokens

    @classmethod
    def load(cls) -> VllmApi:
        from vllm import SamplingParams, TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        return cls(sampling_params=SamplingParams, tokens_prompt=TokensPrompt, delta_kind=RequestOutputKind.DELTA)


class VllmEngine:
    """Generates with vLLM's ``AsyncLLM`` (``vllm.AsyncLLMEngine``) holding the whole model.

    :param llm: a started vLLM async engine.
    :param settings: what the engine was built for (decides :attr:`methods`).
    :param weight_format: reported in the node's hardware profile.
    :param api: vLLM's request constructors (default: imported from vLLM on first use).
    :note: build it with :meth:`load`.
    """

    def __init__(
        self,
        llm: Any,
        *,
        settings: VllmSettings,
        options: VllmEngineOptions,
        weight_format: str,
        api: VllmApi | None = None,
    ) -> None:
        self._llm = llm
        self._api = api
        self._closed = False
        self._ids = itertools.count()
        self.options = options
        self.methods: tuple[str, ...] = served_methods(settings)  # configured method first
        self.weight_format = weight_format
        model_config = getattr(llm, "model_config", None)
        self.max_positions: int = int(getattr(model_config, "max_model_len", 0) or 0)

    @classmethod
    def load(cls, model: str, *, dtype: str, settings: VllmSettings) -> VllmEngine:
        """Check the machine, map the settings, start vLLM's engine (blocking; minutes for large models).

        :raises node.engines.vllm_runtime.EngineUnavailableError: no vLLM or no CUDA device.
        :raises node.engines.vllm_options.VllmConfigError: settings vLLM cannot serve.
        """
        version = require_vllm()
        options = engine_options(
            settings, model=model, dtype=dtype, checkpoint_quantization=read_checkpoint_quantization(model)
        )
        from vllm import AsyncEngineArgs, AsyncLLMEngine

        start = time.perf_counter()
        llm = AsyncLLMEngine.from_engine_args(AsyncEngineArgs(**options.engine_kwargs()))
        engine = cls(llm, settings=settings, options=options, weight_format=settings.weight_format(dtype))
        logger.info(
            "vLLM %s serving %s in %.1f s: method %s (serves %s), options %s",
            version, model, time.perf_counter() - start, settings.method, ", ".join(engine.methods),
            options.engine_kwargs(),
        )
        return engine

    async def generate(self, request: GenerationRequest) -> AsyncIterator[int]:
        """Yield each new token id as vLLM produces it; stops after ``max_new_tokens`` or the EOS token (yielded).

        :raises ValueError: an empty prompt, or prompt + new tokens beyond the engine's context.
        """
        if not wants_tokens(request, self.max_positions, closed=self._closed):
            return
        if self._api is None:
            self._api = VllmApi.load()
        api = self._api
        params = api.sampling_params(**sampling_options(request), output_kind=api.delta_kind)
        vllm_id = f"{request.request_id or 'request'}-{next(self._ids)}"  # unique while in flight
        stream = self._llm.generate(api.tokens_prompt(prompt_token_ids=list(request.prompt_ids)), params, vllm_id)
        finished = False
        try:
            async with contextlib.aclosing(stream):  # closing it aborts the request inside vLLM
                async for output in stream:
                    for token in output.outputs[0].token_ids if output.outputs else ():
                        yield int(token)
                    finished = bool(output.finished)
        finally:
            if not finished:  # cancelled or closed early: make sure vLLM drops the sequence
                with contextlib.suppress(Exception):
                    await self._llm.abort(vllm_id)

    async def close(self) -> None:
        """Shut vLLM's engine down (its engine-core process and GPU memory)."""
        if self._closed:
            return
        self._closed = True
        shutdown = getattr(self._llm, "shutdown", None)
        if shutdown is not None:
            shutdown()
