"""A request the agent is waiting on, and what the agent saw of it once it is over."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from agent.outcomes import Observation
from proto import messages_pb2
from proto.common_pb2 import ErrorCode
from proto.result_signing import Verdict, result_digest


@dataclass(eq=False)
class PendingRequest:
    """A request waiting for its replies."""

    request_id: str
    items: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)  # Chunk, then GenerationResult/DinetError
    submitted: float = 0.0  # perf_counter at publish
    first_token_at: float | None = None
    next_index: int = 0  # tokens received so far (the next chunk should start here)
    node_id: str = ""  # node whose chunks arrived (who answered, when no result comes)
    streamed_text: str = ""
    streamed_token_ids: list[int] = field(default_factory=list)  # what the caller was handed, in order:
    #   checked against the signed result, since chunks are not signed (agent.replies.stream_divergence)


def observation(
    pending: PendingRequest, message: messages_pb2.InferenceResult | None, *, deadline_passed: bool = False,
    now: float | None = None, verdict: Verdict = Verdict.UNSIGNED,
) -> Observation:
    """The agent's own account of a finished request: ``message`` is its result, None when none came.

    ``now``: the perf_counter reading the result was timed with (so an answer whose tokens all came
    with the result has ttft == total, and no made-up decode rate from two clock reads).
    ``verdict``: the result's signature check. A valid signature is forwarded (brokers verify it and
    who owns the key); a refused result is reported as a node failure with no signature, which
    brokers credit to no node (anyone could have sent it in that node's name).
    """
    now = time.perf_counter() if now is None else now
    start = pending.submitted or now
    first = pending.first_token_at
    if message is None:
        return Observation(
            request_id=pending.request_id, node_id=pending.node_id, group="", answered=False, ok=False,
            error_code=0, deadline_passed=deadline_passed, ttft_s=first - start if first is not None else 0.0,
            total_s=now - start, new_tokens=pending.next_index,
        )
    refused = verdict is Verdict.INVALID
    signed = verdict is Verdict.VALID
    return Observation(
        request_id=pending.request_id, node_id=message.node_id, group=message.group, answered=True,
        ok=message.ok and not refused,
        error_code=ErrorCode.NODE_FAILURE if refused else int(message.error.code), deadline_passed=False,
        ttft_s=first - start if first is not None else 0.0, total_s=now - start,
        new_tokens=len(message.token_ids) if message.ok and not refused else pending.next_index,
        signer_key=message.signer_key if signed else b"",
        signature=message.signature if signed else b"",
        answer_digest=result_digest(message) if signed else b"",
    )
