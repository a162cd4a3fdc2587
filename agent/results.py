"""What an agent hands back: streamed chunks and the final result, as plain dataclasses.

Nothing past this module sees protobuf types; :func:`chunk_from_proto` and
:func:`result_from_proto` are the edge. :func:`refusal` is the typed error for a result whose
signature does not verify (:mod:`proto.result_signing`).
"""

from __future__ import annotations

from dataclasses import dataclass

from proto import messages_pb2
from proto.result_signing import ResultSignatureError


@dataclass(frozen=True)
class Chunk:
    """A few new tokens of one request, as they were produced."""

    request_id: str
    index: int  # position of the first of these tokens among the generated ones (0-based)
    token_ids: tuple[int, ...]
    text: str  # their decoded text ("" when it cannot be split off, e.g. a half UTF-8 character)
    node_id: str


@dataclass(frozen=True)
class NodeTiming:
    """Measured by the node that answered."""

    prompt_tokens: int
    new_tokens: int
    ttft_s: float  # prompt processing + first token, at the node
    total_s: float  # whole generation, at the node
    tokens_per_s: float  # decode speed after the first token
    queue_s: float  # from submission to the start of compute (clocks of agent and node)


@dataclass(frozen=True)
class GenerationResult:
    """A finished request."""

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str  # "length" | "eos"
    node_id: str
    group: str
    method: str  # acceleration method the node ran
    node_timing: NodeTiming
    ttft_s: float  # at the agent: submission to first token received
    total_s: float  # at the agent: submission to final result received
    signer_key: bytes = b""  # public key whose signature over this result verified; b"" = the node did not sign
    signer_confirmed: bool | None = None  # True: the signer owns node_id's DHT record (the agent looked it up);
    #   None: not checked (no DHT configured, unsigned, no record found, lookup too slow). A signer known NOT to
    #   own it never gets here: that result is refused (agent/owners.py, SignerNotOwnerError)
    stream_diverged_at: int | None = None  # first streamed token that is not this result's token there; None =
    #   the chunks handed over are a prefix of token_ids. Chunks are not signed, so when they disagree (altered
    #   on the way, or a redelivered task resampled by another node) token_ids and text here are the answer

    @property
    def signed(self) -> bool:
        return bool(self.signer_key)

    @property
    def signer_status(self) -> str:
        """For people: "confirmed" (the named node signed it), "unconfirmed" (signed by someone; whose is not
        known) or "unsigned"."""
        if not self.signed:
            return "unsigned"
        return "confirmed" if self.signer_confirmed else "unconfirmed"

    @property
    def stream_consistent(self) -> bool:
        """Whether the streamed chunks agreed with this result (False: what was streamed is not the answer)."""
        return self.stream_diverged_at is None

    @property
    def tokens_per_s(self) -> float:
        """End-to-end rate seen by the agent, after the first token."""
        decode = self.total_s - self.ttft_s
        n = len(self.token_ids)
        return (n - 1) / decode if n > 1 and decode > 0 else 0.0

    def summary(self) -> str:
        """One line: tokens, time to first token, tokens/s, node, method."""
        return (
            f"{len(self.token_ids)} tokens | TTFT {self.ttft_s * 1000:.0f} ms "
            f"(node {self.node_timing.ttft_s * 1000:.0f} ms) | {self.tokens_per_s:.1f} tok/s "
            f"(node {self.node_timing.tokens_per_s:.1f}) | total {self.total_s:.2f} s | "
            f"node {self.node_id} (signer {self.signer_status}) | group {self.group} | method {self.method} | "
            f"finish {self.finish_reason}"
            + ("" if self.stream_consistent else f" | STREAM MISMATCH at token {self.stream_diverged_at}")
        )

    def to_dict(self) -> dict[str, object]:
        return {
            "request_id": self.request_id,
            "text": self.text,
            "token_ids": list(self.token_ids),
            "tokens": len(self.token_ids),
            "finish_reason": self.finish_reason,
            "node_id": self.node_id,
            "group": self.group,
            "method": self.method,
            "signed": self.signed,
            "signer_confirmed": self.signer_confirmed,
            "stream_consistent": self.stream_consistent,
            "stream_diverged_at": self.stream_diverged_at,
            "ttft_s": round(self.ttft_s, 6),
            "total_s": round(self.total_s, 6),
            "tokens_per_s": round(self.tokens_per_s, 3),
            "node_timing": {
                "prompt_tokens": self.node_timing.prompt_tokens,
                "new_tokens": self.node_timing.new_tokens,
                "ttft_s": round(self.node_timing.ttft_s, 6),
                "total_s": round(self.node_timing.total_s, 6),
                "tokens_per_s": round(self.node_timing.tokens_per_s, 3),
                "queue_s": round(self.node_timing.queue_s, 6),
            },
        }


def chunk_from_proto(message: messages_pb2.TokenChunk) -> Chunk:
    return Chunk(
        request_id=message.request_id,
        index=message.index,
        token_ids=tuple(message.token_ids),
        text=message.text,
        node_id=message.node_id,
    )


def refusal(message: messages_pb2.InferenceResult) -> ResultSignatureError:
    """The error the caller gets for a result whose signature does not verify."""
    return ResultSignatureError(
        f"the result of request {message.request_id} names node {message.node_id!r} but its signature does "
        "not verify (changed on the way, or forged in that node's name), so it was refused; send the request "
        "again, and report the node if it happens again"
    )


def result_from_proto(message: messages_pb2.InferenceResult, *, ttft_s: float, total_s: float,
                      signed: bool = False, signer_confirmed: bool | None = None,
                      stream_diverged_at: int | None = None) -> GenerationResult:
    """``signed``: the caller verified the result's signature (:func:`proto.result_signing.verify_result`).
    ``signer_confirmed``: whether the signer owns the node's DHT record (:func:`agent.owners.signer_confirmation`;
    kept only for a signed result).
    ``stream_diverged_at``: where the streamed chunks left this result's tokens (None: they did not)."""
    t = message.timing
    return GenerationResult(
        request_id=message.request_id,
        text=message.text,
        token_ids=tuple(message.token_ids),
        finish_reason=message.finish_reason,
        node_id=message.node_id,
        group=message.group,
        method=message.method,
        node_timing=NodeTiming(
            prompt_tokens=t.prompt_tokens,
            new_tokens=t.new_tokens,
            ttft_s=t.ttft_s,
            total_s=t.total_s,
            tokens_per_s=t.tokens_per_s,
            queue_s=t.queue_s,
        ),
        ttft_s=ttft_s,
        total_s=total_s,
        signer_key=message.signer_key if signed else b"",
        signer_confirmed=signer_confirmed if signed else None,
        stream_diverged_at=stream_diverged_at,
    )
