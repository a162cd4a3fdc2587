"""Pure broker logic, no RabbitMQ: validation, fairness, reputation, routing, settlement, directory, config."""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import replace
from typing import Any

import pytest

from broker.config import BrokerConfig, ReputationConfig, ValidationLimits, parse_static_group
from broker.consumer import Delivery
from broker.deadletters import DeadLetterWatcher
from broker.directory import GroupDirectory, groups_from_records, records_from_dht_value
from broker.fairness import WeightedFairGate
from broker.features import PrefixTracker
from broker.policies import load_policy
from broker.reputation import ReputationLedger
from broker.routing import Router
from broker.settle import Settler
from broker.status import format_status
from broker.validation import parse_request, reply_target, validate_request
from proto import messages_pb2
from proto.common_pb2 import ErrorCode
from proto.errors import (
    BudgetInvalidError,
    DeadlineExceededError,
    DinetError,
    InvalidRequestError,
    MalformedMessageError,
    MaxNewTokensError,
    NoRouteError,
    PromptEmptyError,
    PromptTooLongError,
    UnknownModelError,
)
from proto.records import NodeRecord
from proto.topology import Topology
from scheduler.interface import FixedRulePolicy
from tests.helpers_reputation import judge

TOPO = Topology("unit")
LIMITS = ValidationLimits()


def request(**fields: Any) -> messages_pb2.InferenceRequest:
    base: dict[str, Any] = {"request_id": "r1", "model": "tiny", "prompt": "hello", "max_new_tokens": 8,
                            "reply_to": TOPO.reply_queue("a1")}
    base.update(fields)
    return messages_pb2.InferenceRequest(**base)


# -- validation ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"prompt": ""}, PromptEmptyError),
        ({"prompt": " \n\t"}, PromptEmptyError),
        ({"prompt": "x" * (LIMITS.max_prompt_chars + 1)}, PromptTooLongError),
        ({"max_new_tokens": 0}, MaxNewTokensError),
        ({"max_new_tokens": LIMITS.max_new_tokens + 1}, MaxNewTokensError),
        ({"budget": -0.01}, BudgetInvalidError),
        ({"budget": math.nan}, BudgetInvalidError),
        ({"budget": math.inf}, BudgetInvalidError),
        ({"priority": "urgent"}, InvalidRequestError),
        ({"request_id": ""}, InvalidRequestError),
        ({"request_id": "x" * 200}, InvalidRequestError),
        ({"model": ""}, InvalidRequestError),
        ({"reply_to": ""}, InvalidRequestError),
        ({"reply_to": "unit.group.g1"}, InvalidRequestError),
        ({"reply_to": "other.reply.a1"}, InvalidRequestError),
        ({"sampling": messages_pb2.SamplingParams(temperature=-1)}, InvalidRequestError),
        ({"sampling": messages_pb2.SamplingParams(top_p=1.5)}, InvalidRequestError),
        ({"method_hint": "nope"}, InvalidRequestError),
        ({"group_hint": "bad name!"}, InvalidRequestError),
        ({"deadline_unix": math.nan}, InvalidRequestError),
        ({"deadline_unix": 999.0}, DeadlineExceededError),
    ],
)
def test_each_bad_field_raises_its_typed_error(fields: dict[str, Any], error: type[DinetError]) -> None:
    with pytest.raises(error) as info:
        validate_request(request(**fields), LIMITS, TOPO, now=1000.0)
    assert str(info.value)  # a message that says what to fix


def test_a_good_request_passes() -> None:
    validate_request(request(priority="batch", budget=1.5, deadline_unix=2000.0, method_hint="spec_ngram",
                             sampling=messages_pb2.SamplingParams(temperature=0.7, top_p=0.9)),
                     LIMITS, TOPO, now=1000.0)


def test_malformed_and_oversized_bodies() -> None:
    with pytest.raises(MalformedMessageError):
        parse_request(b"\xff\xff\xff", LIMITS)
    with pytest.raises(MalformedMessageError):
        parse_request(b"x" * (LIMITS.max_body_bytes + 1), LIMITS)
    assert parse_request(request().SerializeToString(), LIMITS).request_id == "r1"


def test_reply_target_accepts_only_reply_queues_of_the_namespace() -> None:
    assert reply_target(TOPO, "unit.requests.high", "unit.reply.a2") == "unit.reply.a2"
    assert reply_target(TOPO, "unit.reply.a1", "unit.reply.a2") == "unit.reply.a1"
    assert reply_target(TOPO, None, "unit.reply.bad name") is None
    assert reply_target(TOPO, "", None) is None


# -- weighted-fair gate ----------------------------------------------------------------------
async def test_gate_serves_classes_by_weight_and_never_starves_batch() -> None:
    gate = WeightedFairGate(1, {"high": 8, "normal": 3, "batch": 1})
    await gate.acquire("high")  # the only slot is taken: everyone else waits
    order: list[str] = []

    async def worker(priority: str) -> None:
        await gate.acquire(priority)
        order.append(priority)

    tasks = [asyncio.create_task(worker(p)) for p in ["batch"] * 20 + ["normal"] * 20 + ["high"] * 20]
    await asyncio.sleep(0)
    for _ in range(24):
        gate.release()
        await asyncio.sleep(0)
    assert order[:12].count("high") == 8 and order[:12].count("normal") == 3 and order[:12].count("batch") == 1
    assert order[:24].count("batch") == 2
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_gate_cancelled_waiter_passes_its_slot_on() -> None:
    gate = WeightedFairGate(1, {"high": 1, "normal": 1, "batch": 1})
    await gate.acquire("high")
    waiter = asyncio.create_task(gate.acquire("batch"))
    await asyncio.sleep(0)
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    gate.release()
    await asyncio.wait_for(gate.acquire("normal"), 1)  # the slot was not lost


# -- reputation (evidence: the broker's routing record joined with the agent's outcome) -------
def test_failures_sink_a_node_and_decay_restores_it() -> None:
    ledger = ReputationLedger(ReputationConfig(half_life_s=10.0))
    assert ledger.score("new", 0.0) == 1.0  # nobody judged it yet
    for i in range(4):
        judge(ledger, "n1", ok=False, code=ErrorCode.NODE_FAILURE, at=100.0 + i)
    assert not ledger.eligible("n1", 104.0)
    assert ledger.eligible("n1", 104.0 + 30.0)  # three half-lives later the evidence has faded
    for i in range(5):
        judge(ledger, "n1", at=140.0 + i)
    assert ledger.score("n1", 145.0) > 0.7


def test_client_errors_are_neutral_and_timeouts_weigh_more() -> None:
    ledger = ReputationLedger()
    for i in range(10):
        judge(ledger, "n1", ok=False, code=ErrorCode.PROMPT_TOO_LONG, at=float(i))
    assert ledger.score("n1", 10.0) == 1.0
    judge(ledger, "n2", ok=False, code=ErrorCode.DEADLINE_EXCEEDED, at=1.0, new_tokens=3)  # started, then missed
    judge(ledger, "n3", ok=False, code=ErrorCode.NODE_FAILURE, at=1.0)
    assert ledger.score("n2", 1.0) < ledger.score("n3", 1.0)
    judge(ledger, "n4", ok=False, code=ErrorCode.DEADLINE_EXCEEDED, at=1.0, new_tokens=0)  # nothing streamed
    assert ledger.score("n4", 1.0) == 1.0


def test_stalls_against_the_prediction_count_as_failures() -> None:
    ledger = ReputationLedger()
    for i in range(3):
        judge(ledger, "slow", at=float(i), tokens_per_s=1.0, predicted=50.0)
        judge(ledger, "fast", at=float(i), tokens_per_s=60.0, predicted=50.0)
        judge(ledger, "meh", at=float(i), tokens_per_s=20.0, predicted=50.0)
    assert not ledger.eligible("slow", 3.0)
    assert ledger.score("fast", 3.0) == 1.0
    assert 0.5 <= ledger.score("meh", 3.0) < 1.0  # slower than predicted, but latency alone never bans


def test_evidence_from_the_past_does_not_undo_decay() -> None:
    ledger = ReputationLedger(ReputationConfig(half_life_s=1.0))
    judge(ledger, "n", ok=False, code=ErrorCode.NODE_FAILURE, at=100.0)
    judge(ledger, "n", ok=False, code=ErrorCode.NODE_FAILURE, at=50.0)  # routed earlier, judged later: t=100
    assert ledger.table(100.0)[0].failures == 2.0


# -- routing -----------------------------------------------------------------------------
def make_router(static: dict[str, tuple[str, ...]], ledger: ReputationLedger | None = None) -> Router:
    return Router(FixedRulePolicy(), GroupDirectory(static), ledger or ReputationLedger(), broker_id="b1")


def test_route_picks_a_live_group_and_records_reputations() -> None:
    ledger = ReputationLedger()
    judge(ledger, "n1", group="g1", at=time.time())
    decision = make_router({"g1": ("tiny",), "g0": ("other",)}, ledger).route(request(), now=time.time())
    assert decision.group == "g1" and decision.scheduler == "fixed-rule" and decision.broker_id == "b1"
    assert dict(decision.reputations) == {"n1": 1.0}


def test_route_unknown_model_and_hints() -> None:
    router = make_router({"g1": ("tiny",), "g2": ("tiny",)})
    with pytest.raises(UnknownModelError):
        router.route(request(model="nope"), now=0.0)
    with pytest.raises(UnknownModelError):
        router.route(request(group_hint="g9"), now=0.0)
    decision = router.route(request(group_hint="g1", method_hint="spec_ngram"), now=0.0)
    assert decision.group == "g1" and decision.method == "spec_ngram"


def test_a_window_is_routed_like_one_request_at_a_time_with_errors_in_their_slots() -> None:
    router = make_router({"g1": ("tiny",), "g2": ("tiny",)})
    window = [(request(), 0.0, 3), (request(model="nope"), 0.0, 3), (request(group_hint="g2"), 0.0, 3)]
    results = router.route_many(window)
    assert isinstance(results[1], UnknownModelError)
    first, third = results[0], results[2]
    assert isinstance(first, messages_pb2.RoutingDecision) and isinstance(third, messages_pb2.RoutingDecision)
    assert first.group == router.route(request(), now=0.0).group and third.group == "g2"


def test_candidates_are_reused_until_a_report_or_the_clock_moves() -> None:
    now = time.time()
    ledger = ReputationLedger()
    judge(ledger, "bad", group="gz", at=now)
    judge(ledger, "good", group="ga", at=now)
    router = make_router({"ga": ("tiny",), "gz": ("tiny",)}, ledger)
    first = router.candidates(request(), now)
    assert router.candidates(request(), now + 0.5) is first  # same objects: the policy's caches hit
    for i in range(5):  # a burst of failures is seen by the very next request, not after a TTL
        judge(ledger, "bad", group="gz", ok=False, code=ErrorCode.NODE_FAILURE, at=now + i)
    assert [c.group for c in router.candidates(request(), now + 5)] == ["ga"]
    assert router.candidates(request(), now + 7) is not router.candidates(request(), now + 5)


def test_nodes_below_threshold_get_no_work() -> None:
    now = time.time()
    ledger = ReputationLedger()
    for i in range(5):
        judge(ledger, "bad", group="gz", ok=False, code=ErrorCode.NODE_FAILURE, at=now + i)
        judge(ledger, "good", group="ga", at=now + i)
    router = make_router({"ga": ("tiny",), "gz": ("tiny",)}, ledger)
    assert router.route(request(), now=now + 5).group == "ga"  # the fixed rule would prefer gz
    with pytest.raises(NoRouteError):
        router.route(request(group_hint="gz"), now=now + 5)


def test_prefix_tracker_measures_shared_prefixes() -> None:
    tracker = PrefixTracker(block=8)
    prompt = "You are a helpful assistant. Answer briefly: what is 2+2?"
    assert tracker.observe("m", prompt) == 0.0
    assert tracker.observe("m", prompt[:40] + " something else entirely") > 0.5
    assert tracker.observe("other-model", prompt) == 0.0


def test_prefix_tracker_forgets_what_left_its_window() -> None:
    tracker = PrefixTracker(block=8, window=3)
    prompt = "You are a helpful assistant. Answer briefly."
    assert tracker.observe("m", prompt) == 0.0
    assert tracker.observe("m", prompt) == 40 / len(prompt)  # five whole blocks seen before
    for _ in range(3):  # three prompts shorter than a block, of another model, fill the window
        assert tracker.observe("s", "short") == 0.0
    assert tracker.observe("m", prompt) == 0.0  # the earlier ones left the window
    assert tracker.observe("m", prompt) == 40 / len(prompt)
    assert tracker.observe("m", prompt) == 40 / len(prompt)


# -- directory -------------------------------------------------------------------------------
def test_dht_records_are_validated_and_grouped() -> None:
    good = NodeRecord(peer_id="p1", address="a:1", group="g1", models=("tiny",), start_block=0, end_block=2)
    other = NodeRecord(peer_id="p2", address="a:2", group="g1", models=("small",), start_block=0, end_block=2)
    value = {"p1": good.to_dict(), "p2": other.to_dict(), "p3": {"peer_id": 3}, "p4": "garbage"}
    records = records_from_dht_value(value)
    assert [r.peer_id for r in records] == ["p1", "p2"]
    (group,) = groups_from_records(records)
    assert group.nodes == ("p1", "p2") and group.models == {"tiny", "small"}
    directory = GroupDirectory({"static": ("tiny",), "g1": ("old",)})
    directory.set_dht_records(records)
    assert {g.group for g in directory.groups_for("tiny")} == {"g1", "static"}
    assert directory.groups_for("old") == []  # the DHT view of g1 replaces its static entry


# -- settlement ------------------------------------------------------------------------------
class FakeChannel:
    def __init__(self) -> None:
        self.is_closed = False
        self.calls: list[tuple[str, int, bool]] = []

    async def basic_ack(self, tag: int, multiple: bool = False) -> None:
        self.calls.append(("ack", tag, multiple))

    async def basic_reject(self, tag: int, requeue: bool = True) -> None:
        self.calls.append(("reject", tag, requeue))


def delivery(channel: FakeChannel, tag: int) -> Delivery:
    return Delivery("normal", channel, tag, b"", "", "", "", {})  # type: ignore[arg-type]


async def test_settler_acks_contiguous_runs_with_one_frame() -> None:
    channel, settler = FakeChannel(), Settler()
    settler.ack(delivery(channel, 2))
    settler.ack(delivery(channel, 3))
    await asyncio.sleep(0)
    assert channel.calls == []  # tag 1 is still in flight: nothing can be acked yet
    await settler.reject(delivery(channel, 1), requeue=True)
    settler.ack(delivery(channel, 5))
    await settler.drain()
    assert channel.calls == [("reject", 1, True), ("ack", 3, True)]
    settler.ack(delivery(channel, 4))
    await settler.drain()
    assert channel.calls[-1] == ("ack", 5, True)


class SlowChannel(FakeChannel):
    """Every write waits for ``release``, like aiormq's put into a full write queue."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self.started: list[tuple[str, int]] = []

    async def basic_ack(self, tag: int, multiple: bool = False) -> None:
        self.started.append(("ack", tag))
        await self.release.wait()
        await super().basic_ack(tag, multiple)

    async def basic_reject(self, tag: int, requeue: bool = True) -> None:
        self.started.append(("reject", tag))
        await self.release.wait()
        await super().basic_reject(tag, requeue)


async def test_settler_keeps_one_ack_in_flight_per_channel_so_acks_cannot_overtake() -> None:
    channel, settler = SlowChannel(), Settler()
    settler.ack(delivery(channel, 1))
    await asyncio.sleep(0)
    settler.ack(delivery(channel, 2))
    settler.ack(delivery(channel, 3))
    await asyncio.sleep(0.01)
    assert channel.started == [("ack", 1)]  # the ack for 3 waits for the write of 1
    channel.release.set()
    await settler.drain()
    assert channel.calls == [("ack", 1, True), ("ack", 3, True)]


async def test_settler_acks_past_a_reject_only_after_the_reject_is_written() -> None:
    channel, settler = SlowChannel(), Settler()
    rejecting = asyncio.create_task(settler.reject(delivery(channel, 1), requeue=True))
    await asyncio.sleep(0)
    settler.ack(delivery(channel, 2))
    await asyncio.sleep(0.01)
    assert channel.started == [("reject", 1)]  # a multiple-ack for 2 now would ack the requeued 1
    channel.release.set()
    assert await rejecting
    await settler.drain()
    assert channel.calls == [("reject", 1, True), ("ack", 2, True)]


async def test_settler_ignores_closed_channels() -> None:
    channel, settler = FakeChannel(), Settler()
    channel.is_closed = True
    assert not settler.ack(delivery(channel, 1))
    assert not await settler.reject(delivery(channel, 2), requeue=False)
    assert channel.calls == []


# -- dead letters, policies, config, status --------------------------------------------------
def test_dead_letter_classification() -> None:
    watcher = DeadLetterWatcher(TOPO, None, broker_id="b")  # type: ignore[arg-type]
    body = request().SerializeToString()
    task = messages_pb2.RoutedTask(request=request(request_id="r2")).SerializeToString()
    found = watcher.classify({"x-first-death-reason": "delivery_limit",
                              "x-first-death-queue": TOPO.request_queue("high")}, body)
    assert found is not None and found[0].request_id == "r1" and found[1].code_name == "DELIVERY_LIMIT"
    found = watcher.classify({"x-first-death-reason": b"expired", "x-first-death-queue": TOPO.group_queue("g")},
                             task)
    assert found is not None and found[0].request_id == "r2" and found[1].code_name == "DEADLINE_EXCEEDED"
    assert watcher.classify({"x-first-death-reason": "rejected",
                             "x-first-death-queue": TOPO.request_queue("high")}, body) is None
    assert watcher.classify({"x-first-death-reason": "delivery_limit",
                             "x-first-death-queue": TOPO.request_queue("high")}, b"\xff\xff") is None


def test_policies_load_by_name() -> None:
    assert load_policy("fixed-rule").name == "fixed-rule"
    assert load_policy("scheduler.interface:FixedRulePolicy").name == "fixed-rule"
    with pytest.raises(ValueError, match="unknown scheduler"):
        load_policy("no-such-policy")
    with pytest.raises(ValueError):
        load_policy("no_such_module_xyz:factory")


def test_config_checks_and_static_groups() -> None:
    assert parse_static_group("cpu-fp32=tiny,small") == ("cpu-fp32", ("tiny", "small"))
    for bad in ("nogroup", "=tiny", "g=", "bad name=tiny"):
        with pytest.raises(ValueError):
            parse_static_group(bad)
    with pytest.raises(ValueError, match="weights"):
        BrokerConfig(weights={"high": 1, "normal": 1, "batch": 0})
    with pytest.raises(ValueError):
        BrokerConfig(static_groups={"g": ()})
    assert replace(BrokerConfig(), initial_peers=("/ip4/1.2.3.4",)).use_dht


def test_status_table_is_readable() -> None:
    queue = {"queue": "unit.requests.high", "exists": True, "messages": 3, "consumers": 2}
    status = {
        "namespace": "unit", "time": 0.0, "window_s": 60.0,
        "request_queues": [queue], "dead_letters": {**queue, "queue": "unit.dead", "consumers": 0},
        "groups": [{"group": "g1", "models": ["tiny"], "source": "static", "completed_per_s": 1.5,
                    "queue": {**queue, "queue": "unit.group.g1"},
                    "nodes": [{"node_id": "n1", "score": 0.25, "eligible": False, "reports": 9}]}],
        "rates": {"completed_per_s": 1.5, "failed_per_s": 0.1}, "telemetry_reports": 9,
        "schedulers": [{"scheduler": "fixed-rule", "version": "", "decisions": 9}], "reputation_threshold": 0.5,
    }
    text = format_status(status)
    for needle in ("unit.requests.high", "unit.group.g1", "n1", "0.250", "NO", "fixed-rule (9)", "Dead letters: 3"):
        assert needle in text, needle


def test_status_tells_nodes_that_left_the_dht_from_live_ones() -> None:
    queue = {"queue": "unit.group.g1", "exists": True, "messages": 0, "consumers": 1}
    nodes = [{"node_id": "alive", "score": 1.0, "eligible": True, "reports": 3, "live": True},
             {"node_id": "stopped", "score": 1.0, "eligible": True, "reports": 5, "live": False}]
    status = {
        "namespace": "unit", "time": 0.0, "window_s": 60.0, "request_queues": [],
        "dead_letters": {**queue, "queue": "unit.dead"},
        "groups": [{"group": "g1", "models": ["tiny"], "source": "dht", "completed_per_s": 0.0, "queue": queue,
                    "nodes": nodes}],
        "rates": {"completed_per_s": 0.0, "failed_per_s": 0.0}, "telemetry_reports": 8,
        "schedulers": [], "reputation_threshold": 0.5,
    }
    rows = {line.split()[3]: line.split() for line in format_status(status).splitlines() if line.startswith("g1 ")}
    assert rows["alive"][4] == "yes"
    assert rows["stopped"][4] == "gone"
