"""Checks on what a peer sends to a node's ``BlockService``, and the error that ends its stream.

Everything a peer sends is untrusted: the model and block range it targets, the opening
step of a session, every hidden-states tensor (decoded through
:func:`proto.codec.decode_tensor`, then shape-checked) and every step's position. A
check that fails raises :class:`StepError` carrying the gRPC status the servicer
(:mod:`node.blocks.server`) ends that one stream with; other streams are untouched.

These are pure functions of the request and the node's bounds, kept apart from the
servicer so its RPC methods read as the protocol and the rules can be read (and
changed) in one place. They run on the decode hot path, so they stay synchronous and
copy nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
import torch

from node.blocks.kv_cache import SessionCache
from node.blocks.push import MAX_SESSION_ID
from proto import blocks_pb2
from proto.codec import TensorDecodeError, TensorLimits, decode_tensor


class StepError(Exception):
    """A request a peer got wrong; carries the gRPC status to end its stream with."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class InputChecks:
    """The bounds one node holds its peers to: the span it serves and the largest request it takes."""

    model_name: str
    span_start: int  # first block served
    span_end: int  # one past the last block served
    hidden_size: int
    max_batch: int
    max_length: int  # tokens per session: the node's limit, capped by the model's max positions
    tensor_limits: TensorLimits

    def check_target(self, model: str, start: int, end: int) -> tuple[int, int]:
        """``(start, end)`` when it is this node's model and inside its span, else NOT_FOUND."""
        if model != self.model_name:
            raise StepError(grpc.StatusCode.NOT_FOUND, f"this node serves {self.model_name!r}, not {model!r}")
        if not self.span_start <= start < end <= self.span_end:
            raise StepError(
                grpc.StatusCode.NOT_FOUND, f"blocks {start}:{end} not inside served {self.span_start}:{self.span_end}"
            )
        return start, end

    def check_opening(self, step: blocks_pb2.InferenceStep) -> tuple[int, int, int]:
        """The first step of a session: ``(start, end, batch)`` of the session it may open."""
        start, end = self.check_target(step.model, step.start_block, step.end_block)
        if not 0 < len(step.session_id) <= MAX_SESSION_ID:
            raise StepError(grpc.StatusCode.INVALID_ARGUMENT, f"session_id must be 1..{MAX_SESSION_ID} characters")
        if not 0 < step.max_length <= self.max_length:
            raise StepError(grpc.StatusCode.INVALID_ARGUMENT, f"max_length must be in 1..{self.max_length}")
        if not step.HasField("hidden") or len(step.hidden.shape) != 3:
            raise StepError(grpc.StatusCode.INVALID_ARGUMENT, "the first step must carry hidden states [B, T, H]")
        batch = int(step.hidden.shape[0])
        if not 0 < batch <= self.max_batch:
            raise StepError(grpc.StatusCode.INVALID_ARGUMENT, f"batch must be in 1..{self.max_batch}")
        return start, end, batch

    def decode_hidden(self, message: blocks_pb2.Tensor, *, batch: int | None) -> torch.Tensor:
        """Hidden states ``[batch, tokens>=1, hidden_size]``; ``batch=None`` (``Forward``) takes any legal batch."""
        try:
            hidden = decode_tensor(message, self.tensor_limits)
        except TensorDecodeError as exc:
            raise StepError(grpc.StatusCode.INVALID_ARGUMENT, f"bad hidden tensor: {exc}") from None
        if not hidden.is_floating_point():
            raise StepError(grpc.StatusCode.INVALID_ARGUMENT, f"hidden states must be floating, not {hidden.dtype}")
        if hidden.dim() != 3 or hidden.shape[1] == 0 or hidden.shape[2] != self.hidden_size:
            raise StepError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"hidden states must be [batch, tokens>=1, {self.hidden_size}], got {list(hidden.shape)}",
            )
        if batch is not None and hidden.shape[0] != batch:
            raise StepError(grpc.StatusCode.INVALID_ARGUMENT, f"batch {hidden.shape[0]} != session batch {batch}")
        if batch is None and hidden.shape[0] > self.max_batch:
            raise StepError(grpc.StatusCode.INVALID_ARGUMENT, f"batch must be in 1..{self.max_batch}")
        return hidden


def check_position(cache: SessionCache, position: int, new_tokens: int) -> None:
    """Refuse a step that skips ahead or overruns the session; roll the cache back for one that replays."""
    if position > cache.length:
        raise StepError(
            grpc.StatusCode.FAILED_PRECONDITION, f"position {position} beyond the {cache.length} cached tokens"
        )
    if position + new_tokens > cache.spec.max_length:
        raise StepError(
            grpc.StatusCode.OUT_OF_RANGE,
            f"position {position} + {new_tokens} tokens exceeds the session's max_length {cache.spec.max_length}",
        )
    if position < cache.length:
        cache.truncate(position)


def peer_host(peer: str) -> str:
    """``"ipv4:127.0.0.1:5555"`` -> ``"ipv4:127.0.0.1"`` (sessions are counted per host, not per connection)."""
    return peer.rsplit(":", 1)[0] if peer.count(":") > 1 else peer
