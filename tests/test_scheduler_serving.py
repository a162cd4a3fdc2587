"""Selection-time features and predictions equal the training-time ones.

The broker builds feature rows from its own records (request, method table, node
hardware records) and scores them with leaf-mask tables (scheduler/binned.py); both
must mean exactly what the training rows and the trees mean.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from proto.methods import METHODS
from proto.records import HardwareInfo
from scheduler.binned import BinnedForest, PairScorer
from scheduler.config import PredictorConfig
from scheduler.dataset import validate_frame
from scheduler.features import FeatureSpace
from scheduler.interface import RequestFeatures
from scheduler.predictor import MetaPredictor
from scheduler.selection import MetaInfPolicy, SelectionConfig
from scheduler.synthetic import generate, make_hardware
from scheduler.training import train_predictor
from tests.scheduler_helpers import FAST, candidates

# two profiles as the methods benchmark writes them: weight format as bits, emulated per-hop delay
PROFILES = {
    "cpu1-bf16-lan": (HardwareInfo(threads=1, weight_format="bf16", net_rtt_ms=1.0), 1.0, 16.0),
    "cpu2-int8-wan": (HardwareInfo(threads=2, weight_format="int8", net_rtt_ms=10.0), 10.0, 8.0),
}


def _methods_rows() -> pd.DataFrame:
    rows = []
    for hw_name, (hw, delay, bits) in PROFILES.items():
        for method in ("baseline", "continuous_batching", "prefix_caching"):
            for prompt in (64, 512):
                row: dict[str, object] = {
                    "task": f"p{prompt}", "method": method, "hardware": hw_name,
                    "performance": 10.0 + prompt / 100 + len(method) + hw.threads,
                    "task.prompt_tokens": float(prompt), "task.max_new_tokens": 32.0,
                    "task.shared_prefix": 0.5, "task.concurrency": 4.0, "task.repetitive": 0.0,
                    "hw.threads": float(hw.threads), "hw.weight_bits": bits, "hw.delay_ms": delay,
                }
                row.update(METHODS[method].features())
                rows.append(row)
    return validate_frame(pd.DataFrame(rows))


def test_selection_time_row_equals_training_row_for_the_same_group() -> None:
    df = _methods_rows()
    space = FeatureSpace.fit(df, PredictorConfig(use_text=False))
    assert {"hw.weight_bits", "hw.net_rtt_ms", "hw.threads"} <= set(space.hw_cols)
    assert "hw.delay_ms" not in space.hw_cols  # read as hw.net_rtt_ms, which node records carry
    training = space.transform(df)
    for i, row in enumerate(df.itertuples(index=False)):
        hw = PROFILES[row.hardware][0]
        request_values = {
            "task.prompt_tokens": float(df.iloc[i]["task.prompt_tokens"]),
            "task.max_new_tokens": 32.0, "task.shared_prefix_ratio": 0.5, "task.concurrency": 4.0,
            "task.repetition": 0.0,
        }
        task = space.task_vector(request_values, None)
        method = space.method_vector(row.method)
        assert method is not None
        serving = np.concatenate([task, method, space.hardware_vector(row.hardware, hw, None)])
        if space.n_cross:
            flags = method[space.flag_index][None, :]
            serving = np.concatenate([serving, space.crosses(flags, space.cross_task_values(task))[0]])
        np.testing.assert_array_equal(serving, training[i], err_msg=f"row {i} ({row.hardware}, {row.method})")


def test_unknown_weight_format_is_missing_not_zero() -> None:
    space = FeatureSpace.fit(_methods_rows(), PredictorConfig(use_text=False))
    vec = space.hardware_vector("x", HardwareInfo(weight_format="fp8-experimental"), None)
    assert math.isnan(vec[space.hw_cols.index("hw.weight_bits")])


@pytest.fixture(scope="module")
def trained() -> MetaPredictor:
    return train_predictor(generate(tasks=24, reps=1, seed=5, missing=0.2), FAST)


def test_leaf_mask_scoring_equals_tree_walking_for_every_pair(trained: MetaPredictor) -> None:
    space = trained.space
    binned = BinnedForest(trained.forest)
    block = np.stack([np.concatenate([space.method_vector(m), space.hardware_vector(name, hw, None)])
                      for name, hw in make_hardware(4) for m in METHODS]).astype(np.float32)
    flags = block[:, space.flag_index]
    rng = np.random.default_rng(3)
    k = 40
    task = np.full((k, space.n_task), np.nan, np.float32)
    task[:, 0] = rng.integers(8, 4096, k)
    task[:, 1] = rng.choice([16, 128, 512], k)
    task[:, 2] = rng.choice([0.0, 0.5, 0.9], k)
    task[:, 3] = rng.integers(0, 33, k)
    task[: k // 2, 4] = rng.random(k // 2)  # the other half without text: repetition missing
    task[rng.random(task.shape) < 0.1] = np.nan
    g = space.cross_task_values(task)
    nb = block.shape[1]
    x = np.empty((k, len(block), space.n_task + nb + space.n_cross), np.float32)
    x[:, :, : space.n_task] = task[:, None]
    x[:, :, space.n_task : space.n_task + nb] = block
    for i in range(k):
        x[i, :, space.n_task + nb :] = space.crosses(flags, g[i])
    reference = trained.forest.member_sums(x.reshape(-1, x.shape[-1])).reshape(k, len(block), -1)
    batched = PairScorer(binned, space.n_task, block, flags).sums(task, g)
    one_by_one = PairScorer(binned, space.n_task, block, flags)
    single = np.concatenate([one_by_one.sums(task[i : i + 1], g[i : i + 1]) for i in range(k)])
    again = np.concatenate([one_by_one.sums(task[i : i + 1], g[i : i + 1]) for i in range(k)])
    np.testing.assert_allclose(batched, reference, atol=1e-4)
    np.testing.assert_allclose(single, reference, atol=1e-4)
    np.testing.assert_array_equal(again, single)  # the memo returns what was computed
    assert one_by_one.hits >= k  # the second pass came from the memo


def test_policy_predictions_equal_xgboost_on_the_same_rows(trained: MetaPredictor) -> None:
    policy = MetaInfPolicy(trained, SelectionConfig(epsilon=0.0), seed=0)
    groups = candidates(4)
    request = RequestFeatures(model="m", prompt_tokens=700, max_new_tokens=128, shared_prefix_ratio=0.5,
                              concurrency=8)
    scored = policy.score(request, groups)
    space = trained.space
    values = {"task.prompt_tokens": 700.0, "task.max_new_tokens": 128.0, "task.shared_prefix_ratio": 0.5,
              "task.concurrency": 8.0, "task.repetition": math.nan}
    task = space.task_vector(values, None)
    rows = []
    for method, group in zip(scored.methods, scored.groups, strict=True):
        hw = next(c.hardware for c in groups if c.group == group)
        m = space.method_vector(method)
        assert m is not None
        row = np.concatenate([task, m, space.hardware_vector(group, hw, None)])
        rows.append(np.concatenate([row, space.crosses(m[space.flag_index][None], space.cross_task_values(task))[0]]))
    ref = trained.predict_matrix_xgb(np.stack(rows).astype(np.float32))
    np.testing.assert_allclose(np.log(scored.tokens_per_s), ref.mean_log, atol=1e-4)


def test_a_window_of_requests_selects_what_one_by_one_selection_does(trained: MetaPredictor) -> None:
    """The broker scores a prefetch window in one batched prediction; each request gets the same choice as
    alone, and a request that cannot be served gets its typed error without failing the others."""
    from proto.errors import BudgetTooLowError, UnknownModelError

    groups = candidates(4)
    rng = np.random.default_rng(7)
    window = [RequestFeatures(model="m", prompt_tokens=int(rng.integers(8, 4000)),
                              max_new_tokens=int(rng.choice([16, 128, 512])),
                              shared_prefix_ratio=float(rng.choice([0.0, 0.9])), concurrency=int(rng.integers(0, 40)),
                              task_text=str(rng.choice(["Fill in the CSV rows", "Write a short story", ""])))
              for _ in range(24)]
    window[5] = RequestFeatures(model="m", prompt_tokens=100, max_new_tokens=500, budget=1e-12)
    batched = MetaInfPolicy(trained, SelectionConfig(epsilon=0.0), seed=0)
    alone = MetaInfPolicy(trained, SelectionConfig(epsilon=0.0), seed=0)
    results = batched.select_many([(r, groups) for r in window] + [(window[0], [])])
    assert isinstance(results[5], BudgetTooLowError)
    assert isinstance(results[-1], UnknownModelError)
    for request, result in zip(window, results, strict=False):
        if request.budget:
            continue
        assert result == alone.select(request, groups)


def _edge_requests(scorer: PairScorer, n: int, seed: int) -> list[RequestFeatures]:
    """Requests whose numbers sit on, just below and just above the trees' thresholds (float64 values that
    round to a float32 threshold included), with and without task text."""
    rng = np.random.default_rng(seed)
    thr = scorer._task_thr

    def near(j: int, fallback: float) -> float:
        if not thr[j] or rng.random() < 0.2:
            return fallback
        t = float(rng.choice(thr[j]))
        return float(rng.choice([t, t - 1e-12, t + 1e-12, np.nextafter(np.float32(t), np.float32(np.inf)), t - 1]))

    texts = ["", "Fill in the CSV rows", "def f(x):\n    return x\n" * 5, "Write a short story"]
    return [RequestFeatures(model="m", prompt_tokens=max(0, int(near(0, float(rng.integers(1, 5000))))),
                            max_new_tokens=max(1, int(near(1, float(rng.choice([16, 128, 512]))))),
                            shared_prefix_ratio=min(1.0, max(0.0, near(2, rng.random()))),
                            concurrency=max(0, int(near(3, float(rng.integers(0, 200))))),
                            task_text=texts[i % len(texts)])
            for i in range(n)]


def test_single_request_memo_key_is_the_bins_of_the_float32_task_block(trained: MetaPredictor) -> None:
    """The broker keys one request's prediction from Python floats (no numpy); it must be the key the
    array path (float32 task block -> cross_task_values -> bins) gives, thresholds and rounding included."""
    policy = MetaInfPolicy(trained, SelectionConfig(epsilon=0.0), seed=0)
    plan = policy.pairs.plan(candidates(4))
    scorer = plan.scorer
    assert scorer is not None
    space = trained.space
    for request in _edge_requests(scorer, 600, seed=11):
        block = policy.pairs.task_block(request)[None]
        expected = scorer._bins(block, space.cross_task_values(block))[0]
        assert scorer.key(policy.pairs.task_values(request)) == expected, request


def test_one_request_miss_computes_the_batched_sums(trained: MetaPredictor) -> None:
    """A memo miss of one request takes a shorter numpy path; its sums equal the batched path's bit for bit
    (and, through the leaf-mask test above, the trees')."""
    policy = MetaInfPolicy(trained, SelectionConfig(epsilon=0.0), seed=0)
    scorer = policy.pairs.plan(candidates(4)).scorer
    assert scorer is not None
    keys = [scorer.key(policy.pairs.task_values(r)) for r in _edge_requests(scorer, 200, seed=12)]
    batched = scorer._compute(*scorer._rows(np.array(keys, np.intp)))
    one = np.concatenate([scorer._compute_one(key) for key in keys])
    np.testing.assert_array_equal(one, batched)


def test_selections_do_not_depend_on_what_the_memo_holds(trained: MetaPredictor) -> None:
    """Hits, misses one at a time and misses in a window choose the same pairs with the same predictions."""
    groups = candidates(4)
    cold = MetaInfPolicy(trained, SelectionConfig(epsilon=0.0), seed=0)
    warm = MetaInfPolicy(trained, SelectionConfig(epsilon=0.0), seed=0)
    scorer = cold.pairs.plan(groups).scorer
    assert scorer is not None
    requests = _edge_requests(scorer, 120, seed=13)
    window = warm.select_many([(r, groups) for r in requests])  # misses computed together
    for request, batched in zip(requests, window, strict=True):
        assert cold.select(request, groups) == batched  # a miss computed alone
        assert cold.select(request, groups) == batched  # then a hit
