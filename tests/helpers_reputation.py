"""Evidence for reputation tests: a broker's routing record and an agent's outcome, as the ledger gets them."""

from __future__ import annotations

import itertools
from typing import Any

from broker.evidence import Outcome, Route
from broker.reputation import ReputationLedger
from proto import messages_pb2

_ids = itertools.count()


def route(request_id: str, *, group: str = "g", at: float, predicted: float = 0.0, agent: str = "a1") -> Route:
    return Route(request_id=request_id, agent_id=agent, group=group, predicted_tokens_per_s=predicted,
                 routed_at=at, broker_id="b1")


def outcome(request_id: str, node: str, *, group: str = "g", ok: bool = True, code: int = 0, agent: str = "a1",
            answered: bool = True, **fields: Any) -> Outcome:
    base: dict[str, Any] = {"deadline_passed": False, "ttft_s": 0.1, "total_s": 1.0, "tokens_per_s": 0.0,
                            "new_tokens": 8, "observed_at": 0.0}
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
                  **fields: Any) -> messages_pb2.OutcomeReport:
    base: dict[str, Any] = {"answered": True, "ttft_s": 0.1, "total_s": 1.0, "new_tokens": 8, "observed_at": 1.0}
    base.update(fields)
    return messages_pb2.OutcomeReport(request_id=request_id, node_id=node, group=group, ok=ok,
                                      error_code=code,  # type: ignore[arg-type]
                                      agent_id=agent, **base)
