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
        # model -> prefix hash -> how many of the recent requests have that prefix (int keys: cheap to hash,
        # and one dict lookup per model instead of a (model, hash) tuple per prefix: this runs per request)
        self._counts: dict[str, dict[int, int]] = {}
        self._recent: deque[tuple[str, list[int]]] = deque()

    def observe(self, model: str, prompt: str) -> float:
        block = self._block
        keys = [hash(prompt[: block * (i + 1)]) for i in range(min(self._max_blocks, len(prompt) // block))]
        counts = self._counts.get(model)
        if counts is None:
            counts = self._counts[model] = {}
        matched = 0
        for i, key in enumerate(keys):
            if key not in counts:
                break
            matched = (i + 1) * block
        for key in keys:
            counts[key] = counts.get(key, 0) + 1
        self._recent.append((model, keys))
        if len(self._recent) > self._window:
            self._forget(*self._recent.popleft())
        return matched / len(prompt) if prompt else 0.0

    def _forget(self, model: str, keys: list[int]) -> None:
        """Drop one old request's prefixes (and the model's table once it is empty)."""
        if not keys:  # a prompt shorter than a block: nothing counted (its model may have no table now)
            return
        counts = self._counts[model]
        for key in keys:
            left = counts[key] - 1
            if left:
                counts[key] = left
            else:
                del counts[key]
        if not counts:
            del self._counts[model]


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
