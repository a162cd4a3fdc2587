"""LocalEngine: greedy tokens equal transformers `generate`; seeded sampling is reproducible; limits hold."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from node.engine import GenerationRequest
from node.local_engine import LocalEngine
from tests.helpers_worker import reference_greedy, tiny_engine, tiny_tokenizer  # noqa: F401 (fixtures)

PROMPTS = ["def parse(text):", "The quick brown fox", "import os\nimport sys\n"]


async def collect(engine: LocalEngine, request: GenerationRequest) -> list[int]:
    return [token async for token in engine.generate(request)]


@pytest.mark.parametrize("prompt", PROMPTS)
async def test_greedy_matches_transformers_generate(
    tiny_engine: LocalEngine, tiny_tokenizer, tiny_model_path: Path, prompt: str  # noqa: F811
) -> None:
    ids = tuple(tiny_tokenizer.encode(prompt))
    ours = await collect(tiny_engine, GenerationRequest(ids, 24, eos_token_id=tiny_tokenizer.eos_token_id))
    assert ours == reference_greedy(tiny_model_path, prompt, 24)


async def test_seeded_sampling_is_reproducible_and_seed_matters(tiny_engine: LocalEngine, tiny_tokenizer) -> None:  # noqa: F811
    ids = tuple(tiny_tokenizer.encode(PROMPTS[1]))

    def request(seed: int) -> GenerationRequest:
        return GenerationRequest(ids, 32, temperature=1.0, top_p=0.95, seed=seed)

    first = await collect(tiny_engine, request(7))
    again = await collect(tiny_engine, request(7))
    other = await collect(tiny_engine, request(8))
    assert first == again
    assert first != other
    assert len(first) == 32


async def test_concurrent_requests_interleave_without_mixing_state(tiny_engine: LocalEngine, tiny_tokenizer) -> None:  # noqa: F811
    requests = [GenerationRequest(tuple(tiny_tokenizer.encode(p)), 16) for p in PROMPTS]
    alone = [await collect(tiny_engine, r) for r in requests]
    together = await asyncio.gather(*(collect(tiny_engine, r) for r in requests))
    assert list(together) == alone


async def test_stops_at_eos_and_yields_it(tiny_engine: LocalEngine, tiny_tokenizer) -> None:  # noqa: F811
    ids = tuple(tiny_tokenizer.encode(PROMPTS[0]))
    free = await collect(tiny_engine, GenerationRequest(ids, 12))
    stop_at = free[3]
    cut = await collect(tiny_engine, GenerationRequest(ids, 12, eos_token_id=stop_at))
    assert cut == free[: free.index(stop_at) + 1]


async def test_rejects_empty_and_too_long(tiny_engine: LocalEngine) -> None:  # noqa: F811
    with pytest.raises(ValueError, match="empty"):
        await collect(tiny_engine, GenerationRequest((), 4))
    with pytest.raises(ValueError, match="exceeds"):
        await collect(tiny_engine, GenerationRequest((5,) * 1000, 100))
    assert await collect(tiny_engine, GenerationRequest((5,), 0)) == []


async def test_load_rejects_unknown_dtype(tiny_model_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown dtype"):
        LocalEngine.load(str(tiny_model_path), dtype="int3")
