"""Evidence for reputation tests: a broker's routing record and an agent's outcome, as the ledger gets them.

Answers are signed by default, as real nodes sign them (:mod:`proto.result_signing`), by one test key
(:func:`test_signer`); pass ``signed=False`` (or ``signer_key=b""``) for an unsigned one.
"""

from __future__ import annotations

import functools
import itertools
from typing import Any

from hivemind.utils.crypto import RSAPrivateKey

from broker.evidence import Outcome, Route
from broker.reputation import ReputationLedger
from proto import messages_pb2
from proto.result_signing import ResultSigner, answer_digest

_ids = itertools.count()


def route(request_id: str, *, group: str = "g", at: float, predicted: float = 0.0, agent: str = "a1") -> Route:
    return Route(request_id=request_id, agent_id=agent, group=group, predicted_tokens_per_s=predicted,
                 routed_at=at, broker_id="b1")


@functools.cache
def test_signer() -> ResultSigner:
    """One key standing for "the node that answered" in tests that do not care whose key it is."""
    return ResultSigner(RSAPrivateKey())


def outcome(request_id: str, node: str, *, group: str = "g", ok: bool = True, code: int = 0, agent: str = "a1",
            answered: bool = True, **fields: Any) -> Outcome:
    """An outcome as :func:`broker.evidence.parse_outcome` returns it (answers signed by ``signer_key``)."""
    base: dict[str, Any] = {"deadline_passed": False, "ttft_s": 0.1, "total_s": 1.0, "tokens_per_s": 0.0,
                            "new_tokens": 8, "observed_at": 0.0, "signer_key": b"test-key" if answered else b""}
    base.update(fields)
    return Outcome(request_id=request_id, agent_id=agent, node_id=node, group=group if answered else "",
                   answered=answered, ok=ok, error_code=code, **base)


def judge(ledger: ReputationLedger, node: str, *, at: float, group: str = "g", predicted: float = 0.0,
          **fields: Any) -> bool:
    """One routed request of ``group`` that ``node`` answered, as its agent saw it; returns ledger.judge's answer."""
    rid = f"r{next(_ids)}"
    ledger.record_route(route(rid, group=group, at=at, predicted=predicted))
    return ledger.judge(outcome(rid, node, group=group, **fields))


def record_proto(request_id: str, *, group: str, at: float, predicted: float = 0.0, agent: str = "a1"
                 ) -> messages_pb2.RoutingRecord:
    return messages_pb2.RoutingRecord(
        request_id=request_id, agent_id=agent, model="tiny",
        decision=messages_pb2.RoutingDecision(group=group, predicted_tokens_per_s=predicted, routed_at=at,
                                              broker_id="b1"),
    )


def outcome_proto(request_id: str, node: str, *, group: str, ok: bool = True, code: int = 0, agent: str = "a1",
                  signer: ResultSigner | None = None, signed: bool = True, **fields: Any
                  ) -> messages_pb2.OutcomeReport:
    """An agent's report; an answered one carries a signature by ``signer`` (default :func:`test_signer`)."""
    base: dict[str, Any] = {"answered": True, "ttft_s": 0.1, "total_s": 1.0, "new_tokens": 8, "observed_at": 1.0}
    base.update(fields)
    report = messages_pb2.OutcomeReport(request_id=request_id, node_id=node, group=group, ok=ok,
                                        error_code=code,  # type: ignore[arg-type]
                                        agent_id=agent, **base)
    if signed and report.answered and report.node_id:
        signer = signer or test_signer()
        report.answer_digest = answer_digest(range(report.new_tokens), "text", "length")
        report.signer_key = signer.public_key
        report.signature = signer.sign_fields(  # what the node signed, as the agent forwards it
            request_id=request_id, node_id=node, group=group, ok=ok, error_code=code, digest=report.answer_digest)
    return report
