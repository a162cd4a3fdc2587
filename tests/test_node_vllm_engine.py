"""VllmEngine's translation layer, without vLLM: requests in, vLLM's streamed deltas out as single tokens.

The stand-in below reproduces only the output shape dinet relies on (per vLLM's AsyncLLM.generate
with ``RequestOutputKind.DELTA``): each output's ``outputs[0].token_ids`` holds the tokens new in that
step (several when speculative decoding accepts a draft), ``finished`` marks the last one, and
``abort`` drops a request. Whether real vLLM behaves so is what tests/test_node_vllm_gpu.py checks
on a GPU machine; here the translation around it is specified.
"""

from __future__ import annotations

import asyncio
import contextlib
from types import SimpleNamespace
from typing import Any

import pytest

from node.engine import GenerationRequest
from node.engines.vllm_engine import VllmApi, VllmEngine
from node.engines.vllm_options import VllmSettings, engine_options

SCRIPT = [5, 6, 7, 8, 9, 10, 11, 12]  # what the stand-in "model" produces for any prompt


class ScriptedLLM:
    """Streams :data:`SCRIPT` in steps of ``step`` tokens, honouring max_tokens and stop_token_ids."""

    def __init__(self, *, step: int = 3, max_model_len: int = 64) -> None:
        self.model_config = SimpleNamespace(max_model_len=max_model_len)
        self.step = step
        self.requests: list[tuple[dict[str, Any], dict[str, Any], str]] = []
        self.aborted: list[str] = []
        self.closed_early: list[str] = []
        self.shut_down = False

    async def generate(self, prompt: dict[str, Any], params: dict[str, Any], request_id: str):
        self.requests.append((prompt, params, request_id))
        produced: list[int] = []
        for token in SCRIPT:
            produced.append(token)
            if len(produced) == params["max_tokens"] or token in params["stop_token_ids"]:
                break
        steps = [produced[i:i + self.step] for i in range(0, len(produced), self.step)]
        done = False
        try:
            for i, chunk in enumerate(steps):
                await asyncio.sleep(0)
                yield SimpleNamespace(outputs=[SimpleNamespace(token_ids=chunk)], finished=i == len(steps) - 1)
            done = True
        finally:
            if not done:
                self.closed_early.append(request_id)

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def shutdown(self) -> None:
        self.shut_down = True


def make_engine(llm: ScriptedLLM, method: str = "continuous_batching") -> VllmEngine:
    settings = VllmSettings(method=method)
    api = VllmApi(sampling_params=lambda **kw: kw, tokens_prompt=lambda **kw: kw, delta_kind="DELTA")
    options = engine_options(settings, model="stand-in", dtype="float32")
    return VllmEngine(llm, settings=settings, options=options, weight_format="fp32", api=api)


async def collect(engine: VllmEngine, request: GenerationRequest) -> list[int]:
    return [token async for token in engine.generate(request)]


async def test_steps_of_several_tokens_come_out_one_by_one_up_to_and_including_eos() -> None:
    llm = ScriptedLLM(step=3)
    engine = make_engine(llm)
    tokens = await collect(engine, GenerationRequest((1, 2, 3), 16, eos_token_id=8, request_id="r1"))
    assert tokens == [5, 6, 7, 8]
    prompt, params, request_id = llm.requests[0]
    assert prompt == {"prompt_token_ids": [1, 2, 3]}
    assert params["max_tokens"] == 16 and params["stop_token_ids"] == [8] and params["ignore_eos"]
    assert params["output_kind"] == "DELTA"  # only new tokens per output
    assert request_id.startswith("r1-")
    assert llm.aborted == [] and llm.closed_early == []  # a finished request is not aborted


async def test_length_stops_the_request() -> None:
    engine = make_engine(ScriptedLLM(step=2))
    assert await collect(engine, GenerationRequest((1,), 5)) == SCRIPT[:5]


async def test_closing_the_stream_early_aborts_the_request_inside_vllm() -> None:
    llm = ScriptedLLM(step=1)
    engine = make_engine(llm)
    taken: list[int] = []
    async with contextlib.aclosing(engine.generate(GenerationRequest((1,), 8, request_id="r2"))) as stream:
        async for token in stream:
            taken.append(token)
            if len(taken) == 2:
                break
    assert taken == SCRIPT[:2]
    (_, _, request_id), = llm.requests
    assert llm.closed_early == [request_id]  # vLLM's stream was closed (it aborts itself then)
    assert llm.aborted == [request_id]  # and the engine asked vLLM to drop it explicitly


async def test_concurrent_copies_of_one_request_get_distinct_vllm_ids() -> None:
    llm = ScriptedLLM()
    engine = make_engine(llm)
    request = GenerationRequest((1,), 3, request_id="same")
    first, second = await asyncio.gather(collect(engine, request), collect(engine, request))
    assert first == second == SCRIPT[:3]
    ids = [request_id for _, _, request_id in llm.requests]
    assert len(set(ids)) == 2


async def test_requests_outside_the_engine_limits_are_refused_before_vllm_sees_them() -> None:
    llm = ScriptedLLM(max_model_len=8)
    engine = make_engine(llm)
    assert engine.max_positions == 8
    with pytest.raises(ValueError, match="empty"):
        await collect(engine, GenerationRequest((), 4))
    with pytest.raises(ValueError, match="exceeds"):
        await collect(engine, GenerationRequest((1, 2, 3, 4, 5), 4))
    assert await collect(engine, GenerationRequest((1,), 0)) == []
    assert llm.requests == []


async def test_the_engine_reports_its_methods_and_shuts_vllm_down_once() -> None:
    llm = ScriptedLLM()
    engine = make_engine(llm, method="prefix_caching")
    assert engine.methods == ("prefix_caching",)
    await engine.close()
    await engine.close()
    assert llm.shut_down
    with pytest.raises(RuntimeError, match="closed"):
        await collect(engine, GenerationRequest((1,), 2))
