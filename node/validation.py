"""Checks a node makes on every task before computing it (pure functions, no I/O).

Brokers validate requests first; a node checks again because a task queue is only as
trustworthy as whoever can publish to it, and because only the node knows the token
count of a prompt and its model's context length.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from proto import errors, messages_pb2

REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9_.:\-]{1,128}$")


@dataclass(frozen=True)
class Limits:
    """What one node accepts."""

    model_name: str  # the model this node serves (as agents name it)
    max_prompt_chars: int = 32_768  # checked before tokenizing, so a huge prompt costs nothing
    max_prompt_tokens: int = 0  # 0 = the model's context length minus one
    max_new_tokens: int = 4096
    max_positions: int = 0  # the model's context length; 0 = unknown (no check)


def validate_request(request: messages_pb2.InferenceRequest, limits: Limits) -> None:
    """Check the fields that need no tokenizer.

    :raises proto.errors.DinetError: the typed error the agent should see.
    """
    if not REQUEST_ID_RE.match(request.request_id):
        raise errors.InvalidRequestError(
            "request_id must be 1-128 characters from letters, digits, '_', '.', ':', '-'"
        )
    if request.model != limits.model_name:
        raise errors.UnknownModelError(
            f"this node serves model {limits.model_name!r}, not {request.model!r}; "
            "check the model name or route the request to a group that serves it"
        )
    if not request.prompt.strip():
        raise errors.PromptEmptyError("the prompt is empty; send some text to continue")
    if len(request.prompt) > limits.max_prompt_chars:
        raise errors.PromptTooLongError(
            f"the prompt has {len(request.prompt)} characters; this node accepts at most {limits.max_prompt_chars}"
        )
    if not 1 <= request.max_new_tokens <= limits.max_new_tokens:
        raise errors.MaxNewTokensError(
            f"max_new_tokens is {request.max_new_tokens}; it must be between 1 and {limits.max_new_tokens}"
        )
    sampling = request.sampling
    if not math.isfinite(sampling.temperature) or sampling.temperature < 0:
        raise errors.InvalidRequestError(f"temperature must be finite and >= 0, got {sampling.temperature}")
    if not math.isfinite(sampling.top_p) or not 0 <= sampling.top_p <= 1:
        raise errors.InvalidRequestError(f"top_p must be between 0 and 1, got {sampling.top_p}")
    if not math.isfinite(request.budget) or request.budget < 0:
        raise errors.BudgetInvalidError(f"budget must be a finite number >= 0, got {request.budget}")


def validate_prompt_tokens(n_prompt: int, max_new_tokens: int, limits: Limits) -> None:
    """Check the tokenized prompt against the model's context.

    :raises proto.errors.DinetError: ``PROMPT_TOO_LONG`` or ``MAX_NEW_TOKENS_OUT_OF_RANGE``.
    """
    if n_prompt == 0:
        raise errors.PromptEmptyError("the prompt tokenizes to nothing; send some text to continue")
    max_prompt = limits.max_prompt_tokens or (limits.max_positions - 1 if limits.max_positions else 0)
    if max_prompt and n_prompt > max_prompt:
        raise errors.PromptTooLongError(
            f"the prompt is {n_prompt} tokens; this node accepts at most {max_prompt}; shorten it"
        )
    if limits.max_positions and n_prompt + max_new_tokens > limits.max_positions:
        raise errors.MaxNewTokensError(
            f"prompt ({n_prompt} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's context of "
            f"{limits.max_positions} tokens; ask for at most {limits.max_positions - n_prompt} new tokens"
        )
