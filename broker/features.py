"""Request meta-features the broker can compute cheaply without a tokenizer.

The scheduler's data embedding needs, per request, an estimate of the prompt
length in tokens and how much of the prompt repeats recent traffic (prefix caching
pays off then). Both are computed here in microseconds.
"""

from __future__ import annotations

from collections import deque

from proto import messages_pb2
from proto.topology import DEFAULT_PRIORITY
from scheduler.interface import RequestFeatures

CHARS_PER_TOKEN = 4  # rough average of byte-level BPE on English text
TASK_TEXT_CHARS = 256


def estimate_tokens(text: str) -> int:
    return max(1, (len(text) + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN)


class PrefixTracker:
    """Remembers block-aligned prompt prefixes of the last ``window`` requests (per model).

    :meth:`observe` returns the share of the prompt covered by the longest prefix
    (in ``block``-character steps, up to ``max_blocks``) already seen recently.
    """

    def __init__(self, *, block: int = 64, max_blocks: int = 8, window: int = 512) -> None:
        self._block = block
        self._max_blocks = max_blocks
        self._window = window
        self._counts: dict[tuple[str, int], int] = {}
        self._recent: deque[list[tuple[str, int]]] = deque()

    def observe(self, model: str, prompt: str) -> float:
        keys = [
            (model, hash(prompt[: self._block * (i + 1)]))
            for i in range(min(self._max_blocks, len(prompt) // self._block))
        ]
        matched = 0
        for i, key in enumerate(keys):
            if key not in self._counts:
                break
            matched = (i + 1) * self._block
        for key in keys:
            self._counts[key] = self._counts.get(key, 0) + 1
        self._recent.append(keys)
        if len(self._recent) > self._window:
            for key in self._recent.popleft():
                left = self._counts[key] - 1
                if left:
                    self._counts[key] = left
                else:
                    del self._counts[key]
        return matched / len(prompt) if prompt else 0.0


def request_features(
    request: messages_pb2.InferenceRequest, *, shared_prefix_ratio: float, concurrency: int
) -> RequestFeatures:
    return RequestFeatures(
        model=request.model,
        prompt_tokens=estimate_tokens(request.prompt),
        max_new_tokens=request.max_new_tokens,
        shared_prefix_ratio=shared_prefix_ratio,
        concurrency=concurrency,
        priority=request.priority or DEFAULT_PRIORITY,
        budget=request.budget,
        task_text=request.prompt[:TASK_TEXT_CHARS],
    )
