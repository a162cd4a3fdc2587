"""VllmEngine end to end on the tiny model: greedy equals transformers, sampling, concurrency, cancellation.

Needs vLLM (``pip install '.[vllm]'``) and a CUDA GPU; skipped otherwise, with the reason.
Not yet run on hardware: no GPU was available where it was written (docs/methods.md says so).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch

from node.engine import GenerationRequest
from tests.helpers_worker import reference_greedy, tiny_tokenizer  # noqa: F401 (fixture)

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("the vLLM engine needs a CUDA GPU and torch sees none", allow_module_level=True)
pytest.importorskip("vllm", reason="vLLM is not installed (pip install '.[vllm]' on a GPU machine)")

from node.engines.vllm_engine import VllmEngine  # noqa: E402  (after the skips: imports nothing heavy itself)
from node.engines.vllm_options import VllmSettings  # noqa: E402

PROMPTS = ["def parse(text):", "The quick brown fox", "import os\nimport sys\n"]
SMALL_GPU_SHARE = 0.25  # the tiny model needs almost nothing; leave the GPU to others


async def collect(engine: VllmEngine, request: GenerationRequest) -> list[int]:
    return [token async for token in engine.generate(request)]


@contextlib.asynccontextmanager
async def vllm_engine(model: Path, method: str) -> AsyncIterator[VllmEngine]:
    settings = VllmSettings(method=method, gpu_memory_utilization=SMALL_GPU_SHARE, enforce_eager=True)
    engine = VllmEngine.load(str(model), dtype="float32", settings=settings)
    try:
        yield engine
    finally:
        await engine.close()


@pytest.mark.parametrize("method", ["baseline", "continuous_batching", "prefix_caching", "chunked_prefill",
                                    "spec_ngram", "all"])
async def test_greedy_tokens_equal_transformers_for_each_lossless_method(
    tiny_model_path: Path, tiny_tokenizer, method: str  # noqa: F811
) -> None:
    async with vllm_engine(tiny_model_path, method) as engine:
        assert engine.methods[0] == method
        for prompt in PROMPTS:
            ids = tuple(tiny_tokenizer.encode(prompt))
            request = GenerationRequest(ids, 24, eos_token_id=tiny_tokenizer.eos_token_id, method=method)
            assert await collect(engine, request) == reference_greedy(tiny_model_path, prompt, 24), prompt


async def test_sampling_seeds_concurrency_eos_and_cancellation(tiny_model_path: Path, tiny_tokenizer) -> None:  # noqa: F811
    async with vllm_engine(tiny_model_path, "continuous_batching") as engine:
        ids = tuple(tiny_tokenizer.encode(PROMPTS[1]))

        def sampled(seed: int) -> GenerationRequest:
            return GenerationRequest(ids, 32, temperature=1.0, top_p=0.95, seed=seed)

        first = await collect(engine, sampled(7))
        assert first == await collect(engine, sampled(7))
        assert first != await collect(engine, sampled(8))
        assert len(first) == 32

        requests = [GenerationRequest(tuple(tiny_tokenizer.encode(p)), 16) for p in PROMPTS]
        alone = [await collect(engine, r) for r in requests]
        assert list(await asyncio.gather(*(collect(engine, r) for r in requests))) == alone

        free = alone[0]
        cut = await collect(engine, GenerationRequest(requests[0].prompt_ids, 16, eos_token_id=free[3]))
        assert cut == free[: free.index(free[3]) + 1]  # stops right after the EOS token, which is yielded

        long = GenerationRequest(requests[0].prompt_ids, 200)
        taken: list[int] = []
        async with contextlib.aclosing(engine.generate(long)) as stream:  # type: ignore[type-var]
            async for token in stream:
                taken.append(token)
                if len(taken) == 3:
                    break
        assert len(taken) == 3  # closed early: vLLM aborts the rest
        assert await collect(engine, requests[0]) == alone[0]  # and the engine keeps serving
