"""The contract between the node's task worker and whatever computes tokens.

A whole model in this process (:mod:`node.local_engine`), a chain of block servers
found in the DHT (the sharded engine) and vLLM on a GPU (:mod:`node.engines.vllm_engine`)
implement the same :class:`Engine`, so the worker that consumes tasks, streams chunks and
reports timings does not care which. An engine may also have a ``methods`` attribute: the
acceleration methods it really executes, the one it falls back to first unless it lists
``baseline`` (:func:`node.task_answer.choose_method`); without it, ``baseline`` only.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None  # seeds sampling; identical seed + request = identical tokens
    method: str = "baseline"  # acceleration method name (proto.methods)
    eos_token_id: int | None = None  # stop early when produced
    request_id: str = ""


class Engine(Protocol):
    """Produces the new token ids of a request, one at a time, as soon as each is known."""

    def generate(self, request: GenerationRequest) -> AsyncIterator[int]: ...

    async def close(self) -> None: ...


def wants_tokens(request: GenerationRequest, max_positions: int, *, closed: bool) -> bool:
    """The checks every engine makes before generating: False when no token is asked for.

    The worker validates requests first; engines check again because other callers (drivers, tests,
    benchmarks) reach them directly.

    :raises RuntimeError: the engine is closed.
    :raises ValueError: an empty prompt, or prompt + new tokens beyond ``max_positions`` (0 = no limit).
    """
    if closed:
        raise RuntimeError("engine is closed")
    if not request.prompt_ids:
        raise ValueError("empty prompt")
    if request.max_new_tokens <= 0:
        return False
    total = len(request.prompt_ids) + request.max_new_tokens
    if max_positions and total > max_positions:
        raise ValueError(f"prompt + max_new_tokens = {total} exceeds the engine's {max_positions} positions")
    return True
