"""The reputation fence without RabbitMQ: its state machine, the check loop over a stand-in ledger, the knobs."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field, replace

import pytest
from aiormq.exceptions import ChannelInvalidStateError

from broker.config import ReputationConfig
from node.__main__ import _node_config, build_parser
from node.fence import FenceAction, FenceState, ReputationFence, check_reputation_config
from node.validation import Limits
from node.worker_config import WorkerConfig


def test_state_fences_when_ineligible_and_resumes_only_when_eligible_again() -> None:
    state = FenceState()
    assert state.decide(eligible=True) is FenceAction.NONE
    assert state.decide(eligible=False) is FenceAction.FENCE
    assert not state.fenced  # a decision changes nothing until it is applied
    state.applied(FenceAction.FENCE, now=100.0)
    assert state.fenced and state.fenced_since == 100.0 and state.fences == 1
    assert state.decide(eligible=False) is FenceAction.NONE  # already fenced: no second cancel
    assert state.decide(eligible=True) is FenceAction.RESUME
    state.applied(FenceAction.RESUME, now=130.0)
    assert not state.fenced and state.fenced_since is None and state.resumes == 1
    assert state.decide(eligible=False) is FenceAction.FENCE  # sinks again on new evidence


def test_a_stopped_state_never_resumes_nor_fences() -> None:
    state = FenceState()
    state.applied(FenceAction.FENCE, now=1.0)
    state.stop()  # the worker is draining
    assert state.decide(eligible=True) is FenceAction.NONE
    assert state.decide(eligible=False) is FenceAction.NONE


@dataclass
class FakeLedger:
    """Scores by node id; eligible at 0.5 and above, as the real ledger with its default threshold."""

    scores: dict[str, float] = field(default_factory=dict)
    asked_at: list[float] = field(default_factory=list)

    def score(self, node_id: str, now: float) -> float:
        return self.scores.get(node_id, 1.0)

    def eligible(self, node_id: str, now: float) -> bool:
        self.asked_at.append(now)
        return self.score(node_id, now) >= 0.5


@dataclass
class FakeConsumer:
    consuming: bool = True
    calls: list[str] = field(default_factory=list)
    fail_resumes: int = 0  # this many resume attempts raise a transport error first

    async def pause(self) -> None:
        self.calls.append("pause")
        self.consuming = False

    async def resume(self) -> None:
        self.calls.append("resume")
        if self.fail_resumes:
            self.fail_resumes -= 1
            raise ChannelInvalidStateError("connection lost")
        self.consuming = True


def _fence(ledger: FakeLedger, consumer: FakeConsumer, clock: list[float]) -> ReputationFence:
    return ReputationFence("me", ledger, threshold=0.5, pause=consumer.pause, resume=consumer.resume,
                           interval_s=0.01, clock=lambda: clock[0])


async def test_check_pauses_and_resumes_the_consumer_from_the_ledgers_verdict_on_this_node_only() -> None:
    ledger, consumer, clock = FakeLedger({"other": 0.1}), FakeConsumer(), [1000.0]
    fence = _fence(ledger, consumer, clock)
    assert await fence.check() is FenceAction.NONE  # another node's bad score is not ours
    ledger.scores["me"] = 0.2
    assert await fence.check() is FenceAction.FENCE and fence.fenced and not consumer.consuming
    assert await fence.check() is FenceAction.NONE
    clock[0] = 1300.0
    ledger.scores["me"] = 0.6
    assert await fence.check() is FenceAction.RESUME and not fence.fenced and consumer.consuming
    assert consumer.calls == ["pause", "resume"]
    assert ledger.asked_at[-1] == 1300.0  # evidence aged to the clock's now


async def test_a_resume_lost_to_the_transport_is_retried_at_the_next_check() -> None:
    ledger, consumer, clock = FakeLedger({"me": 0.2}), FakeConsumer(fail_resumes=1), [0.0]
    fence = _fence(ledger, consumer, clock)
    await fence.check()
    ledger.scores["me"] = 0.9
    assert await fence.check() is FenceAction.NONE and fence.fenced  # still fenced: it did not happen
    assert await fence.check() is FenceAction.RESUME and consumer.consuming
    assert consumer.calls == ["pause", "resume", "resume"]


async def test_run_keeps_checking_until_stopped_and_survives_a_failing_check() -> None:
    ledger, consumer, clock = FakeLedger({"me": 0.2}), FakeConsumer(), [0.0]
    fence = _fence(ledger, consumer, clock)
    broken = {"left": 1}
    real_eligible = ledger.eligible

    def flaky_eligible(node_id: str, now: float) -> bool:
        if broken["left"]:
            broken["left"] -= 1
            raise RuntimeError("a bug in one check")
        return real_eligible(node_id, now)

    ledger.eligible = flaky_eligible  # type: ignore[method-assign]
    loop = asyncio.create_task(fence.run())
    try:
        for _ in range(200):
            if fence.fenced:
                break
            await asyncio.sleep(0.01)
        assert fence.fenced and broken["left"] == 0
        fence.state.stop()  # draining: the loop ends and never resumes
        ledger.scores["me"] = 0.9
        await asyncio.wait_for(loop, timeout=2)
    finally:
        loop.cancel()
    assert fence.fenced and consumer.calls == ["pause"]


def test_reputation_knobs_are_checked() -> None:
    assert check_reputation_config(ReputationConfig()) == ReputationConfig()
    for bad in ({"threshold": 1.5}, {"threshold": float("nan")}, {"half_life_s": 0.0}, {"prior": -0.1},
                {"prior_weight": 0.0}, {"prior": 0.4}):
        with pytest.raises(ValueError, match="reputation"):
            check_reputation_config(replace(ReputationConfig(), **bad))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="fence_check_s"):
        WorkerConfig(node_id="n", group="g", limits=Limits(model_name="tiny"), fence_check_s=0.0)
    with pytest.raises(ValueError, match="threshold"):
        WorkerConfig(node_id="n", group="g", limits=Limits(model_name="tiny"),
                     reputation=ReputationConfig(threshold=2.0))


def test_cli_takes_the_brokers_reputation_knobs_and_can_turn_the_fence_off() -> None:
    args = build_parser().parse_args(["run", "--model", "m", "--group", "g", "--reputation-threshold", "0.3",
                                      "--reputation-half-life", "60"])
    config = _node_config(args)
    assert config.reputation_fence and config.reputation == ReputationConfig(threshold=0.3, half_life_s=60.0)
    off = _node_config(build_parser().parse_args(["run", "--model", "m", "--group", "g", "--no-reputation-fence"]))
    assert not off.reputation_fence and off.reputation == ReputationConfig()
    with pytest.raises(ValueError, match="half_life_s"):
        _node_config(build_parser().parse_args(["run", "--model", "m", "--group", "g",
                                                "--reputation-half-life", "0"]))
