"""Checked evidence for reputation: agents' ``OutcomeReport`` s and brokers' ``RoutingRecord`` s.

Anyone who can write to the telemetry stream can write these, so every field is checked
before the ledger sees it (finite, non-negative numbers, bounded strings, a known error
code, fields that agree with each other). A bad entry raises :class:`EvidenceError`,
which the telemetry consumer logs and skips: it never stops the consumer.

An answered outcome may carry the node's signature over the answer
(:mod:`proto.result_signing`), forwarded by the agent; :func:`parse_outcome` verifies it
over the outcome's own fields (a signature that does not verify is an :class:`EvidenceError`),
and :func:`attribution_problem` says whether the verified signer may stand for the node the
outcome names: a key the node id derives from (:mod:`proto.node_identity`, no DHT needed); for an id
of the key-derived form no other key, ever; for an id of another form the one owner of that node's DHT
record (several claimants and none self-certified: nobody), else the key already credited for it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from google.protobuf.message import DecodeError, Message

from proto import messages_pb2
from proto.common_pb2 import ErrorCode
from proto.node_identity import certification
from proto.result_signing import DIGEST_BYTES, signed_bytes, verify_signature

MAX_ID_CHARS = 128  # request ids, node ids, agent ids, group names
MAX_SECONDS = 7 * 86400.0  # a request measured as taking longer than a week is not a measurement
MAX_TOKENS_PER_S = 1e7
MAX_NEW_TOKENS = 1 << 20
MIN_UNIX = 1e9  # 2001: an event time before this is a zero or a broken clock
MAX_UNIX = 1e11
KNOWN_CODES = frozenset(ErrorCode.values())
# The owner "key" of a node id that several keys claim in the DHT, none of them self-certified: no signer is
# that key (a signer key is never empty), so nobody is credited, and the DHT view cannot be fooled into one.
AMBIGUOUS_OWNER = b""


class EvidenceError(ValueError):
    """A telemetry entry that is not acceptable evidence; the message says which field and why."""


@dataclass(frozen=True)
class Route:
    """What the broker that routed a request decided (from its ``RoutingRecord``)."""

    request_id: str
    agent_id: str
    group: str
    predicted_tokens_per_s: float  # 0 = the scheduler made no prediction
    routed_at: float  # broker clock, unix seconds: the event time of any judgement of this request
    broker_id: str


@dataclass(frozen=True)
class Outcome:
    """What an agent saw for one of its requests (from its ``OutcomeReport``)."""

    request_id: str
    agent_id: str
    node_id: str  # "" when nothing at all came back
    group: str  # "" when no result came
    answered: bool
    ok: bool
    error_code: int
    deadline_passed: bool
    ttft_s: float
    total_s: float
    tokens_per_s: float
    new_tokens: int
    observed_at: float
    signer_key: bytes = b""  # the key whose signature over this answer verified; b"" = unsigned answer

    def observed_rate(self) -> float | None:
        """Tokens/s the agent got, or None when it cannot be told.

        The agent's decode rate after the first token when it measured one; when the whole
        answer arrived at once (nothing streamed), the end-to-end rate, which can only make
        the node look slower, never faster; a one-token answer has no rate.
        """
        if self.tokens_per_s > 0:
            return self.tokens_per_s
        if self.new_tokens >= 2 and self.total_s > 0:
            return self.new_tokens / self.total_s
        return None


def _text(value: str, name: str, *, required: bool = False) -> str:
    if required and not value:
        raise EvidenceError(f"{name} is empty")
    if len(value) > MAX_ID_CHARS or not value.isprintable():
        raise EvidenceError(f"{name} is longer than {MAX_ID_CHARS} characters or not printable")
    return value


def _number(value: float, name: str, high: float) -> float:
    if not math.isfinite(value) or value < 0 or value > high:
        raise EvidenceError(f"{name}={value!r} is not a finite number in [0, {high:g}]")
    return float(value)


def _parse_into(message: Message, body: bytes) -> None:
    try:
        message.ParseFromString(body)
    except (DecodeError, ValueError) as exc:
        raise EvidenceError(f"{type(message).__name__} does not parse ({exc})") from exc


def parse_route(body: bytes) -> Route:
    """:raises EvidenceError: unparsable, or a field out of range."""
    record = messages_pb2.RoutingRecord()
    _parse_into(record, body)
    return route_of(record)


def parse_route_batch(body: bytes) -> list[messages_pb2.RoutingRecord]:
    """The records of a ``RoutingRecordBatch`` (check each with :func:`route_of`, so one bad record is skipped alone).

    :raises EvidenceError: unparsable.
    """
    batch = messages_pb2.RoutingRecordBatch()
    _parse_into(batch, body)
    return list(batch.records)


def route_of(record: messages_pb2.RoutingRecord) -> Route:
    """:raises EvidenceError: a field out of range."""
    decision = record.decision
    routed_at = decision.routed_at
    if not math.isfinite(routed_at) or not MIN_UNIX <= routed_at <= MAX_UNIX:
        raise EvidenceError(f"decision.routed_at={routed_at!r} is not a plausible unix time")
    return Route(
        request_id=_text(record.request_id, "request_id", required=True),
        agent_id=_text(record.agent_id, "agent_id"),
        group=_text(decision.group, "decision.group", required=True),
        predicted_tokens_per_s=_number(decision.predicted_tokens_per_s, "predicted_tokens_per_s", MAX_TOKENS_PER_S),
        routed_at=routed_at,
        broker_id=_text(decision.broker_id, "decision.broker_id"),
    )


def parse_outcome(body: bytes) -> Outcome:
    """:raises EvidenceError: unparsable, a field out of range, or fields that contradict each other."""
    report = messages_pb2.OutcomeReport()
    _parse_into(report, body)
    if report.error_code not in KNOWN_CODES:
        raise EvidenceError(f"error_code={report.error_code} is not a known ErrorCode")
    if report.ok and (not report.answered or report.error_code != ErrorCode.ERROR_CODE_UNSPECIFIED):
        raise EvidenceError("ok=true needs answered=true and no error_code")
    if report.deadline_passed and report.answered:
        raise EvidenceError("deadline_passed is only for requests that got no answer")
    if report.answered and not report.node_id:
        raise EvidenceError("an answered request names the node that answered it")
    outcome = Outcome(
        request_id=_text(report.request_id, "request_id", required=True),
        agent_id=_text(report.agent_id, "agent_id"),
        node_id=_text(report.node_id, "node_id"),
        group=_text(report.group, "group"),
        answered=report.answered,
        ok=report.ok,
        error_code=int(report.error_code),
        deadline_passed=report.deadline_passed,
        ttft_s=_number(report.ttft_s, "ttft_s", MAX_SECONDS),
        total_s=_number(report.total_s, "total_s", MAX_SECONDS),
        tokens_per_s=_number(report.tokens_per_s, "tokens_per_s", MAX_TOKENS_PER_S),
        new_tokens=int(_number(report.new_tokens, "new_tokens", MAX_NEW_TOKENS)),
        observed_at=_number(report.observed_at, "observed_at", MAX_UNIX),
    )
    if outcome.ttft_s > outcome.total_s + 1e-6:
        raise EvidenceError(f"ttft_s={outcome.ttft_s} is after total_s={outcome.total_s}")
    signer = _verified_signer(report)
    return dataclasses.replace(outcome, signer_key=signer) if signer else outcome


def _verified_signer(report: messages_pb2.OutcomeReport) -> bytes:
    """The signer key of a signed answer whose signature verifies over the report's fields; b"" when unsigned.

    :raises EvidenceError: half a signature, or one that does not verify (forged, or an outcome the node
        did not sign: another node, request, group, ok or error code).
    """
    parts = (report.signer_key, report.signature, report.answer_digest)
    if not any(parts):
        return b""
    if not all(parts) or not report.answered:
        raise EvidenceError("signer_key, signature and answer_digest come together, and only with an answer")
    if len(report.answer_digest) != DIGEST_BYTES:
        raise EvidenceError(f"answer_digest is {len(report.answer_digest)} bytes, not {DIGEST_BYTES}")
    data = signed_bytes(request_id=report.request_id, node_id=report.node_id, group=report.group, ok=report.ok,
                        error_code=report.error_code, digest=report.answer_digest)
    if not verify_signature(report.signer_key, data, report.signature):
        raise EvidenceError(f"the answer's signature does not verify for node {report.node_id!r} "
                            f"(request {report.request_id!r})")
    return report.signer_key


def attribution_problem(outcome: Outcome, *, owner_key: bytes | None, known_key: bytes | None) -> str:
    """Why ``outcome`` may not move ``outcome.node_id``'s reputation, or "" when it may.

    Only answers are checked: an outcome with no answer names the node whose (unsigned) chunks
    arrived and is judged as before. An answer must be signed, by the key that owns the named
    node's DHT record when the broker knows that record (``owner_key``; :data:`AMBIGUOUS_OWNER`
    when several keys claim it: nobody then), else by the key of the last answer credited to that
    node id in the stream (``known_key``; ``None``: none yet, and the first signer is trusted).
    Before all of these, the id itself (:func:`proto.node_identity.certification`): a signer it derives
    from may always stand for it, and for an id of the key-derived form (every node of this version) no
    other signer ever can, whatever the DHT shows or whoever was credited first.
    """
    if not outcome.answered or not outcome.node_id:
        return ""
    if not outcome.signer_key:
        return "answer not signed"
    certified = certification(outcome.node_id, outcome.signer_key)
    if certified is True:
        return ""  # the node id is a hash of this key: no other key can stand for it, whatever the DHT says
    if certified is False:
        return "the named node's id derives from another key"
    if owner_key == AMBIGUOUS_OWNER:
        return "several keys claim the named node's DHT record"
    if owner_key is not None:
        return "" if outcome.signer_key == owner_key else "signer does not own the named node's DHT record"
    if known_key is not None and outcome.signer_key != known_key:
        return "signer is not the key already credited for the named node"
    return ""
