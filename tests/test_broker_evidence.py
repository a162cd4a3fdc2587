"""Reputation is judged on what agents saw, joined with what brokers predicted; never on a node's own word.

Stream entries go through :meth:`TelemetryConsumer.handle` as bytes with their AMQP type,
the path every broker takes, with no RabbitMQ in between.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, replace
from typing import Any

from agent.outcomes import Observation
from broker.config import ReputationConfig
from broker.evidence import EvidenceError, parse_outcome
from broker.reputation import ReputationLedger
from broker.telemetry import TelemetryConsumer
from node.telemetry import TelemetryTail
from proto import messages_pb2
from proto.common_pb2 import ErrorCode
from proto.telemetry import OUTCOME_REPORT, ROUTING_RECORD, TIMING_REPORT
from proto.topology import Topology
from tests.helpers_reputation import outcome, outcome_proto, record_proto, route

T0 = 1.7e9
Entry = tuple[bytes, str | None]


class Rows:
    """A sink standing in for the meta-training set."""

    def __init__(self) -> None:
        self.request_ids: list[str] = []

    def observe(self, report: messages_pb2.TimingReport) -> None:
        self.request_ids.append(report.request_id)


def consumer(config: ReputationConfig | None = None) -> tuple[TelemetryConsumer, Rows]:
    rows = Rows()
    return TelemetryConsumer(Topology("unit"), ReputationLedger(config), [rows]), rows


def feed(target: TelemetryConsumer, entries: list[Entry]) -> None:
    for offset, (body, kind) in enumerate(entries, start=(target.last_offset or 0) + 1):
        target.handle(body, offset, kind)


def node_says(rid: str, node: str, group: str, *, ok: bool, at: float, tokens_per_s: float = 500.0) -> Entry:
    report = messages_pb2.TimingReport(
        request_id=rid, node_id=node, group=group, ok=ok, finished_at=at,
        error_code=ErrorCode.ERROR_CODE_UNSPECIFIED if ok else ErrorCode.NODE_FAILURE,
        timing=messages_pb2.Timing(new_tokens=8, total_s=0.016, tokens_per_s=tokens_per_s),
    )
    return report.SerializeToString(), TIMING_REPORT


def request_entries(i: int, node: str, group: str, *, agent_ok: bool, node_ok: bool, predicted: float = 0.0,
                    agent_rate: float = 40.0) -> list[Entry]:
    """One request as the stream holds it: broker record, node's own report, agent's outcome."""
    rid, at = f"{node}-{i}", T0 + i
    code = ErrorCode.ERROR_CODE_UNSPECIFIED if agent_ok else ErrorCode.NODE_FAILURE
    return [
        (record_proto(rid, group=group, at=at, predicted=predicted).SerializeToString(), ROUTING_RECORD),
        node_says(rid, node, group, ok=node_ok, at=at),
        (outcome_proto(rid, node, group=group, ok=agent_ok, code=code, tokens_per_s=agent_rate).SerializeToString(),
         OUTCOME_REPORT),
    ]


def test_a_node_that_claims_success_is_judged_on_what_its_agents_saw() -> None:
    target, rows = consumer()
    for i in range(4):
        feed(target, request_entries(i, "liar", "g", agent_ok=False, node_ok=True))
        feed(target, request_entries(i, "slowpoke", "g", agent_ok=True, node_ok=True, predicted=50.0, agent_rate=2.0))
    now = T0 + 4
    assert not target.ledger.eligible("liar", now)
    assert not target.ledger.eligible("slowpoke", now)  # "500 tokens/s", said the node; the agent got 2
    assert {r.node_id: r.last_error for r in target.ledger.table(now)} == {"liar": "NODE_FAILURE",
                                                                            "slowpoke": "STALL"}
    assert len(rows.request_ids) == 8  # the nodes' own reports still reach the meta-training set


def test_a_node_that_reports_failures_but_serves_well_stays_eligible() -> None:
    target, rows = consumer()
    for i in range(6):
        feed(target, request_entries(i, "modest", "g", agent_ok=True, node_ok=False, predicted=50.0, agent_rate=45.0))
    assert target.ledger.eligible("modest", T0 + 6)
    assert target.ledger.table(T0 + 6)[0].failures == 0.0
    assert rows.request_ids == [f"modest-{i}" for i in range(6)]


def test_node_reports_alone_move_no_reputation() -> None:
    target, _ = consumer()
    feed(target, [node_says(f"r{i}", "n", "g", ok=False, at=T0 + i) for i in range(10)])
    assert target.ledger.table(T0 + 10) == [] and target.ledger.observed == 0


def test_replaying_the_same_stream_gives_the_same_table() -> None:
    entries: list[Entry] = []
    for i in range(60):
        entries += request_entries(i, f"n{i % 3}", f"g{i % 2}", agent_ok=i % 4 != 0, node_ok=True, predicted=12.0,
                                   agent_rate=10.0 if i % 5 else 1.0)
    first, _ = consumer()
    second, _ = consumer()
    feed(first, entries)
    feed(second, entries[: len(entries) // 2])
    feed(second, entries[len(entries) // 2 :])  # the same stream, read in two sittings
    now = T0 + 100
    assert first.ledger.table(now) == second.ledger.table(now)
    assert {row.node_id for row in first.ledger.table(now)} == {"n0", "n1", "n2"}
    assert first.ledger.observed == 60


def test_bad_entries_are_dropped_and_the_consumer_keeps_going() -> None:
    target, _ = consumer()
    feed(target, [(record_proto("r1", group="g", at=T0).SerializeToString(), ROUTING_RECORD)])
    bad = [
        outcome_proto("r1", "n", group="g", ttft_s=math.nan),
        outcome_proto("r1", "n", group="g", total_s=-1.0),
        outcome_proto("r1", "n", group="g", tokens_per_s=math.inf),
        outcome_proto("r1", "n" * 500, group="g"),
        outcome_proto("r1", "n\x00", group="g"),
        outcome_proto("r1", "n", group="g", code=99),  # no such ErrorCode
        outcome_proto("r1", "n", group="g", ok=True, code=ErrorCode.NODE_FAILURE),
        outcome_proto("r1", "", group="g", ok=False, code=ErrorCode.NODE_FAILURE),  # answered by nobody?
        outcome_proto("r1", "n", group="g", ttft_s=5.0, total_s=1.0),
        outcome_proto("", "n", group="g"),
    ]
    feed(target, [(b.SerializeToString(), OUTCOME_REPORT) for b in bad])
    feed(target, [(b"\xff\xff\xff", OUTCOME_REPORT), (b"\xff\xff", ROUTING_RECORD), (b"\xff\xff", TIMING_REPORT)])
    not_unix = record_proto("r2", group="g", at=0.0)
    feed(target, [(not_unix.SerializeToString(), ROUTING_RECORD), (b"whatever", "SomethingNewer")])
    assert target.malformed == len(bad) + 4 and target.skipped == 1
    assert target.ledger.table(T0) == [] and target.ledger.pending_routes == 1
    feed(target, [(outcome_proto("r1", "n", group="g", ok=False, code=ErrorCode.INTERNAL).SerializeToString(),
                   OUTCOME_REPORT)])  # the good one still counts
    assert target.ledger.table(T0)[0].failures == 1.0


def test_outcomes_that_do_not_match_the_routing_record_are_ignored() -> None:
    ledger = ReputationLedger()
    ledger.record_route(route("r1", group="g", at=T0, agent="alice"))
    fail: dict[str, Any] = {"ok": False, "code": ErrorCode.NODE_FAILURE}
    assert not ledger.judge(outcome("r1", "victim", group="other", agent="alice", **fail))  # not where it went
    assert not ledger.judge(outcome("r1", "victim", group="g", agent="mallory", **fail))  # not who asked
    assert not ledger.judge(outcome("r9", "victim", group="g", agent="alice", **fail))  # never routed
    assert not ledger.judge(outcome("r1", "broker:b1", group="g", agent="alice", **fail))  # not a node
    assert ledger.table(T0) == []
    assert ledger.judge(outcome("r1", "n", group="g", agent="alice", **fail))
    assert not ledger.judge(outcome("r1", "n", group="g", agent="alice", **fail))  # once per request
    assert ledger.table(T0)[0].failures == 1.0
    assert sum(ledger.ignored.values()) == 5


def test_no_answer_is_blamed_only_on_a_node_that_had_started() -> None:
    ledger = ReputationLedger()
    for rid in ("r1", "r2", "r3"):
        ledger.record_route(route(rid, group="g", at=T0))
    assert ledger.judge(outcome("r1", "", answered=False, ok=False, deadline_passed=True, new_tokens=0))
    assert ledger.unattributed == 1 and ledger.table(T0) == []  # nobody knows who held it
    ledger.judge(outcome("r2", "n", answered=False, ok=False, deadline_passed=True, new_tokens=3))
    assert ledger.table(T0)[0].failures == ledger.config.timeout_weight  # its chunks came, then nothing
    ledger.judge(outcome("r3", "n", answered=False, ok=False, deadline_passed=False, new_tokens=3))
    assert ledger.table(T0)[0].failures == ledger.config.timeout_weight  # the agent merely stopped waiting


def test_pending_routing_records_are_bounded() -> None:
    ledger = ReputationLedger(replace(ReputationConfig(), pending_routes=3))
    for i in range(5):
        ledger.record_route(route(f"r{i}", at=T0 + i))
    assert ledger.pending_routes == 3
    assert not ledger.judge(outcome("r0", "n", ok=False, code=ErrorCode.INTERNAL))  # dropped unjudged
    assert ledger.judge(outcome("r4", "n", ok=False, code=ErrorCode.INTERNAL))
    assert ledger.pending_routes == 2


def test_what_the_agent_publishes_passes_the_brokers_checks() -> None:
    seen = Observation(request_id="r1", node_id="n", group="g", answered=True, ok=True, error_code=0,
                       deadline_passed=False, ttft_s=0.2, total_s=1.2, new_tokens=11)
    parsed = parse_outcome(seen.to_proto("a1").SerializeToString())
    assert parsed.ok and parsed.node_id == "n" and parsed.agent_id == "a1"
    assert math.isclose(parsed.tokens_per_s, 10.0) and parsed.observed_rate() == parsed.tokens_per_s
    at_once = replace(seen, ttft_s=1.2)  # nothing streamed: the end-to-end rate is what the agent got
    assert math.isclose(parse_outcome(at_once.to_proto("a1").SerializeToString()).observed_rate() or 0, 11 / 1.2)
    timed_out = replace(seen, answered=False, ok=False, deadline_passed=True, group="")
    assert parse_outcome(timed_out.to_proto("a1").SerializeToString()).deadline_passed
    try:
        parse_outcome(replace(seen, deadline_passed=True).to_proto("a1").SerializeToString())
    except EvidenceError as exc:
        assert "deadline_passed" in str(exc)
    else:
        raise AssertionError("an answered request with deadline_passed was accepted")


@dataclass
class FakeMessage:
    body: bytes
    type: str | None

    async def ack(self) -> None:
        return None


def test_a_node_counts_only_timing_reports_as_answered() -> None:
    """The broker's record comes *before* the task: a node must not take it as "already answered"."""
    tail = TelemetryTail(Topology("unit"), lookback_s=60)
    entries = [
        FakeMessage(record_proto("routed", group="g", at=time.time()).SerializeToString(), ROUTING_RECORD),
        FakeMessage(outcome_proto("seen", "n", group="g").SerializeToString(), OUTCOME_REPORT),
        FakeMessage(node_says("done", "n", "g", ok=True, at=time.time())[0], TIMING_REPORT),
        FakeMessage(node_says("legacy", "n", "g", ok=True, at=time.time())[0], None),
    ]

    async def run() -> None:
        for message in entries:
            await tail._on_message(message)  # type: ignore[arg-type]

    asyncio.run(run())
    assert {rid for rid in ("routed", "seen", "done", "legacy") if rid in tail.answered} == {"done", "legacy"}


def test_new_entries_read_by_an_old_parser_look_empty() -> None:
    """Field numbers from 101: a reader that parses everything as a TimingReport finds no request id or node."""
    for message in (record_proto("r1", group="g", at=T0), outcome_proto("r1", "n", group="g")):
        legacy = messages_pb2.TimingReport.FromString(message.SerializeToString())
        assert legacy.request_id == "" and legacy.node_id == "" and not legacy.ok
