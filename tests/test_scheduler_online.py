"""The feedback loop: telemetry rows -> background retrain -> new version used -> selection follows the data."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import pandas as pd

from scheduler.__main__ import main
from scheduler.interface import GroupCandidate, RequestFeatures
from scheduler.online import OnlineLearner
from scheduler.selection import SelectionConfig
from scheduler.synthetic import CANONICAL_HARDWARE
from tests.scheduler_helpers import FAST, report

GROUP, HW = CANONICAL_HARDWARE[0]
CANDIDATES = [GroupCandidate(GROUP, HW, ("n1",), {}, ("baseline", "spec_ngram"))]
REQUEST = RequestFeatures(model="tiny", prompt_tokens=100, max_new_tokens=256, concurrency=1)


def feed(learner: OnlineLearner, n: int, speeds: dict[str, float]) -> None:
    """``n`` reports per method; throughput around ``speeds[method]`` with a little spread in the workload."""
    for i in range(n):
        for method, tps in speeds.items():
            learner.observe(report(group=GROUP, hw=HW, method=method, tokens_per_s=tps * (1 + 0.02 * (i % 5)),
                                   prompt_tokens=80 + 10 * (i % 5), concurrency=1 + i % 2))


def test_learner_retrains_swaps_and_follows_the_data(tmp_path: Path) -> None:
    state = tmp_path / "state"
    learner = OnlineLearner.create(
        state, retrain_every=60, retrain_interval_s=0, min_rows=40, max_rows=120, config=FAST,
        selection=SelectionConfig(epsilon=0.0), seed=0,
    )
    try:
        # cold start: the documented expert rules, reported as such
        assert learner.status()["scheduler"] == "expert-rules" and learner.model_version == ""
        first = learner.select(REQUEST, CANDIDATES)
        assert (first.scheduler, first.method) == ("expert-rules", "baseline")

        # telemetry says prompt-lookup decoding is 3x faster here -> retrain -> MetaInf picks it
        feed(learner, 30, {"baseline": 20.0, "spec_ngram": 60.0})
        assert learner.wait_for_trains(1, timeout=120), learner.status()
        v1 = learner.model_version
        assert v1.startswith("v0001-") and learner.policy.name == "metainf"
        sel = learner.select(REQUEST, CANDIDATES)
        assert (sel.scheduler, sel.method, sel.model_version) == ("metainf", "spec_ngram", v1)
        assert sel.predicted_tokens_per_s > 40

        # the data changes (e.g. a node upgrade made the baseline fast): newer rows win -> new version, new pick
        feed(learner, 60, {"baseline": 80.0, "spec_ngram": 25.0})
        assert learner.wait_for_trains(2, timeout=120) and learner.wait_idle(120), learner.status()
        v2 = learner.model_version
        assert int(v2[1:5]) >= 2 and v2 != v1  # one or two retrains, depending on how fast the rows came
        sel = learner.select(REQUEST, CANDIDATES)
        assert (sel.method, sel.model_version) == ("baseline", v2)

        status = learner.status()
        assert status["rows"] == 180 and status["trains"] >= 2 and status["last_error"] == ""
        assert status["decisions"] >= 1 and status["top_features"]
    finally:
        learner.close()

    # duplicates (a replayed stream) and failed runs are not rows
    again = OnlineLearner.create(state, retrain_every=1000, retrain_interval_s=0, config=FAST, start=False)
    try:
        assert again.model_version == v2 and again.rows_total == 180  # resumed from disk
        dup = report(group=GROUP, hw=HW, method="baseline", tokens_per_s=10.0, request_id="same")
        assert again.observe(dup) is True
        assert again.observe(dup) is False
        assert again.observe(report(group=GROUP, hw=HW, method="baseline", tokens_per_s=5.0, ok=False)) is False
        assert again.status()["rows"] == 181 and again.status()["rejected_reports"] == 2
    finally:
        again.close()

    # the stored meta-training set exports to parquet/csv
    out = tmp_path / "rows.parquet"
    assert main(["export", "--state-dir", str(state), "--out", str(out)]) == 0
    df = pd.read_parquet(out)
    assert len(df) == 181 and {"task", "method", "hardware", "performance", "hw.cpu_cores"} <= set(df.columns)
    assert main(["export", "--state-dir", str(tmp_path / "none"), "--out", str(tmp_path / "x.csv")]) == 2


def test_retrain_by_time_and_close_stops_the_thread(tmp_path: Path) -> None:
    learner = OnlineLearner.create(tmp_path, retrain_every=10_000, retrain_interval_s=0.2, min_rows=20, config=FAST,
                                   seed=0, in_process=True)  # the fit in the retrain thread itself
    try:
        feed(learner, 15, {"baseline": 20.0, "spec_ngram": 60.0})
        assert learner.wait_for_trains(1, timeout=120), learner.status()  # the interval fired, not the count
        assert learner.status()["rows_since_train"] == 0
    finally:
        learner.close(timeout=30)
    assert learner.retrainer.thread is not None and not learner.retrainer.thread.is_alive()


def test_too_few_rows_keeps_expert_rules(tmp_path: Path) -> None:
    learner = OnlineLearner.create(tmp_path, retrain_every=5, retrain_interval_s=0, min_rows=50, config=FAST,
                                   start=False)
    feed(learner, 3, {"baseline": 20.0})
    assert learner.retrain_now() is None and "needed" in learner.last_error
    assert learner.policy.name == "expert-rules"
    learner.close()


def test_close_cancels_a_running_training(tmp_path: Path) -> None:
    slow = replace(FAST, rounds=100_000, ensemble=1)
    learner = OnlineLearner.create(tmp_path, retrain_every=10_000, retrain_interval_s=0, min_rows=20, config=slow)
    feed(learner, 20, {"baseline": 20.0, "spec_ngram": 60.0})
    learner.request_retrain()
    deadline = time.monotonic() + 60
    while learner.retrainer.proc is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc = learner.retrainer.proc
    assert proc is not None and learner.status()["training"]
    started = time.monotonic()
    learner.close(timeout=30)
    assert time.monotonic() - started < 10
    assert not proc.is_alive() and learner.last_error == "training cancelled"
    assert learner.policy.name == "expert-rules" and learner.trains == 0


def test_broker_factory_builds_a_learning_policy(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """`dinet-broker run --scheduler metainf [--scheduler-model PATH]` goes through scheduler.metainf.build_policy."""
    from scheduler.metainf import build_policy
    from scheduler.synthetic import generate
    from scheduler.training import train_predictor

    monkeypatch.setenv("DINET_SCHEDULER_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("DINET_SCHEDULER_TEXT", "0")
    cold = build_policy(None)
    try:
        assert cold.name == "expert-rules" and callable(cold.observe)
        assert cold.status()["state_dir"] == str(tmp_path / "state")
    finally:
        cold.close()
    model = train_predictor(generate(tasks=6, reps=1), FAST).save(tmp_path / "model")
    warm = build_policy(str(model))
    try:
        assert warm.name == "metainf" and warm.model_version.startswith("m-")
        assert warm.select(REQUEST, CANDIDATES).model_version == warm.model_version
    finally:
        warm.close()
