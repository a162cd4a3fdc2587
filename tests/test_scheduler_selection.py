"""Algorithm 2: budgets, typed errors, reputation, bounded exploration, expert rules."""

from __future__ import annotations

import pytest

from proto.common_pb2 import ErrorCode
from proto.errors import BudgetInvalidError, BudgetTooLowError, UnknownModelError
from scheduler.interface import GroupCandidate, RequestFeatures
from scheduler.selection import ExpertRulesPolicy, MetaInfPolicy, SelectionConfig, expert_method
from scheduler.synthetic import generate
from scheduler.training import train_predictor
from tests.scheduler_helpers import FAST, candidates

GREEDY = SelectionConfig(epsilon=0.0, ucb_kappa=0.0)


@pytest.fixture(scope="module")
def predictor():  # type: ignore[no-untyped-def]
    return train_predictor(generate(tasks=40, reps=1, seed=11), FAST)


def request(**kw: object) -> RequestFeatures:
    base = {"model": "tiny", "prompt_tokens": 200, "max_new_tokens": 128, "concurrency": 1}
    base.update(kw)
    return RequestFeatures(**base)  # type: ignore[arg-type]


def test_selection_records_policy_version_and_prediction(predictor) -> None:  # type: ignore[no-untyped-def]
    policy = MetaInfPolicy(predictor, GREEDY, seed=0)
    sel = policy.select(request(), candidates())
    assert sel.scheduler == "metainf" and sel.model_version == predictor.version
    assert sel.predicted_tokens_per_s > 0 and sel.predicted_cost > 0 and not sel.exploration
    ranked = policy.explain(request(), candidates())
    assert len(ranked) == 32  # 8 methods x 4 groups in one batch
    assert (ranked[0]["method"], ranked[0]["group"]) == (sel.method, sel.group)


def test_budget_excludes_the_faster_group_then_the_cheaper_one_is_chosen(predictor) -> None:  # type: ignore[no-untyped-def]
    policy = MetaInfPolicy(predictor, GREEDY, seed=0)
    groups = [c for c in candidates() if c.group in ("cpu-2c", "gpu-a100")]
    req = request(max_new_tokens=256)
    rows = policy.explain(req, groups)
    fast = max(rows, key=lambda r: r["tokens_per_s"])
    cheap = [r for r in rows if r["group"] == "cpu-2c"]
    assert fast["group"] == "gpu-a100" and policy.select(req, groups).group == "gpu-a100"
    cheapest_fast = min(r["cost"] for r in rows if r["group"] == "gpu-a100")
    budget = (max(r["cost"] for r in cheap) + cheapest_fast) / 2
    assert budget < cheapest_fast  # the fast group is over budget with every method
    sel = policy.select(request(max_new_tokens=256, budget=budget), groups)
    assert sel.group == "cpu-2c" and sel.predicted_cost <= budget
    best_cheap = max(cheap, key=lambda r: r["score"])
    assert sel.method == best_cheap["method"]


def test_budget_too_low_is_typed(predictor) -> None:  # type: ignore[no-untyped-def]
    policy = MetaInfPolicy(predictor, GREEDY, seed=0)
    cheapest = min(r["cost"] for r in policy.explain(request(), candidates()))
    with pytest.raises(BudgetTooLowError, match="cheapest") as info:
        policy.select(request(budget=cheapest / 2), candidates())
    assert info.value.code == ErrorCode.BUDGET_TOO_LOW and info.value.code_name == "BUDGET_TOO_LOW"
    assert info.value.to_proto().code == ErrorCode.BUDGET_TOO_LOW
    with pytest.raises(BudgetInvalidError):
        policy.select(request(budget=-1.0), candidates())
    with pytest.raises(UnknownModelError):
        policy.select(request(), [])


def test_reputation_weighs_groups(predictor) -> None:  # type: ignore[no-untyped-def]
    policy = MetaInfPolicy(predictor, GREEDY, seed=0)
    cands = candidates()
    best = policy.select(request(), cands).group
    judged = [GroupCandidate(c.group, c.hardware, c.nodes, {c.nodes[0]: 0.01 if c.group == best else 1.0},
                             c.methods) for c in cands]
    assert policy.select(request(), judged).group != best


def test_exploration_is_bounded_in_rate_and_loss(predictor) -> None:  # type: ignore[no-untyped-def]
    cfg = SelectionConfig(epsilon=0.1, min_ratio=0.5)
    policy = MetaInfPolicy(predictor, cfg, seed=1)
    cands = candidates()
    req = request(concurrency=8, max_new_tokens=256)
    rows = {(r["method"], r["group"]): r for r in policy.explain(req, cands)}
    best = max(r["tokens_per_s"] for r in rows.values())
    picks = [policy.select(req, cands) for _ in range(2000)]
    explored = [s for s in picks if s.exploration]
    assert 0.06 < len(explored) / len(picks) < 0.14
    assert all(rows[(s.method, s.group)]["tokens_per_s"] >= 0.5 * best - 1e-9 for s in explored)
    assert len({(s.method, s.group) for s in explored}) >= 2  # not always the same runner-up
    assert policy.explorations == len(explored)
    high = [policy.select(request(concurrency=8, max_new_tokens=256, priority="high"), cands) for _ in range(300)]
    assert not any(s.exploration for s in high)


def test_unknown_methods_are_skipped_and_rules_cover_the_rest(predictor) -> None:  # type: ignore[no-untyped-def]
    policy = MetaInfPolicy(predictor, GREEDY, seed=0)
    cands = [GroupCandidate(c.group, c.hardware, c.nodes, {}, ("mystery", "baseline")) for c in candidates(2)]
    assert policy.select(request(), cands).method == "baseline"
    only_unknown = [GroupCandidate(c.group, c.hardware, c.nodes, {}, ("mystery",)) for c in candidates(2)]
    assert policy.select(request(), only_unknown).scheduler == "expert-rules"


def test_expert_rules() -> None:
    all_methods = ("baseline", "prefix_caching", "continuous_batching", "chunked_prefill", "spec_ngram")
    assert expert_method(512, 64, 0.8, 1, 0.0, all_methods) == "prefix_caching"
    assert expert_method(100, 64, 0.0, 8, 0.0, all_methods) == "continuous_batching"
    assert expert_method(2048, 64, 0.0, 1, 0.0, all_methods) == "chunked_prefill"
    assert expert_method(100, 256, 0.0, 1, 0.5, all_methods) == "spec_ngram"
    assert expert_method(100, 64, 0.0, 1, 0.5, all_methods) == "baseline"
    assert expert_method(100, 256, 0.0, 8, 0.5, ("baseline", "spec_ngram")) == "spec_ngram"  # next rule that fits
    nan = float("nan")
    assert expert_method(nan, nan, nan, nan, nan, all_methods) == "baseline"


def test_expert_rules_policy_reports_itself_and_respects_budget() -> None:
    policy = ExpertRulesPolicy()
    cands = candidates()
    sel = policy.select(request(concurrency=8), cands)
    assert sel.scheduler == "expert-rules" and sel.method == "continuous_batching" and sel.group == "gpu-a100"
    runtime = 128 / ExpertRulesPolicy.ASSUMED_TOKENS_PER_S
    cost = {c.group: c.hardware.price_per_hour / 3600 * runtime for c in cands}
    sel = policy.select(request(budget=cost["cpu-2c"] * 1.01), cands)
    assert sel.group == "cpu-2c"
    with pytest.raises(BudgetTooLowError):
        policy.select(request(budget=cost["cpu-2c"] / 2), cands)

