"""Evaluation: the planted-structure check and the `dinet-scheduler` command line."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from scheduler.__main__ import main
from scheduler.evaluation import evaluate, make_folds
from scheduler.predictor import PredictorConfig
from scheduler.synthetic import generate


def test_metainf_finds_the_planted_best_method_on_held_out_tasks() -> None:
    """Which method wins depends on prompt length, concurrency, output length, prefix sharing, repetition and
    hardware; on tasks it never saw, MetaInf must pick the planted winner in >= 95% of (task, hardware) cells."""
    df = generate(tasks=300, reps=1, seed=0)
    result = evaluate(df, "task", PredictorConfig(use_text=False), folds=4, seed=0)  # default model, no LM text
    s = result.summary()
    assert s["cells"] > 800 and s["folds"] == 4
    assert s["metainf_planted_top1"] >= 0.95, s
    assert s["metainf_regret"] < min(s["best_single_regret"], s["expert_regret"], s["random_regret"])
    assert s["metainf_regret"] <= 0.02


def test_make_folds_hold_out_whole_groups() -> None:
    assert make_folds(["b", "a"], 10, 0) == [["a"], ["b"]]
    folds = make_folds([f"t{i}" for i in range(23)], 5, 0)
    assert len(folds) == 5 and sorted(t for fold in folds for t in fold) == sorted(f"t{i}" for i in range(23))


@pytest.fixture(scope="module")
def small_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("synth") / "small.csv"
    assert main(["synth", "--out", str(path), "--tasks", "12", "--reps", "1", "--missing", "0.1"]) == 0
    return path


FAST_ARGS = ["--no-text", "--ensemble", "2", "--rounds", "20", "--quiet"]


def test_evaluate_cli_prints_table_and_json(small_file: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["evaluate", "--dataset", str(small_file), "--split", "task", "--folds", "4", "--json",
               "--plots", str(tmp_path / "figs"), *FAST_ARGS])
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0
    assert out[1].split() == ["selector", "regret", "median", "p90", "top-1"]
    summary = json.loads(out[-1])
    for key in ("metainf_regret", "random_regret", "best_single_regret", "expert_regret", "metainf_top1"):
        assert 0.0 <= summary[key] <= 1.0
    assert summary["split"] == "task" and summary["folds"] == 4
    assert summary["metainf_regret"] < summary["random_regret"]
    pngs = sorted(p.name for p in (tmp_path / "figs").glob("*.png"))
    assert pngs == ["predicted_vs_measured.png", "regret_by_selector.png"]
    assert all((tmp_path / "figs" / p).stat().st_size > 5000 for p in pngs)


def test_evaluate_cli_hardware_split(small_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", "--dataset", str(small_file), "--split", "hardware", "--json", *FAST_ARGS]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["split"] == "hardware" and summary["folds"] == 4


def test_train_and_info_cli(small_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "model"
    assert main(["train", "--dataset", str(small_file), "--out", str(model), *FAST_ARGS[:-1]]) == 0
    out = capsys.readouterr().out
    assert "feature importances" in out and "importance by embedding" in out
    assert main(["info", "--model", str(model)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["version"].startswith("m-") and info["importances"]


def test_cli_errors_are_clear(small_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", "--dataset", str(tmp_path / "missing.csv"), "--no-text"]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"task": ["a"], "method": ["baseline"], "hardware": ["h"]}).to_csv(bad, index=False)
    assert main(["train", "--dataset", str(bad), "--no-text"]) == 2
    assert "missing required column(s) performance" in capsys.readouterr().err
    one_hw = tmp_path / "one_hw.csv"
    df = pd.read_csv(small_file)
    df[df["hardware"] == df["hardware"].iloc[0]].to_csv(one_hw, index=False)
    assert main(["evaluate", "--dataset", str(one_hw), "--split", "hardware", *FAST_ARGS]) == 2
    assert "at least two distinct hardware" in capsys.readouterr().err
    assert main(["info", "--model", str(tmp_path)]) == 2
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    assert "--split" in capsys.readouterr().out


def test_capped_runs_are_reported_apart() -> None:
    df = generate(tasks=10, reps=1, seed=2)
    df["capped"] = (df["task"] == df["task"].iloc[0]) & (df["method"] == "baseline")  # one task's baseline was cut off
    s = evaluate(df, "task", PredictorConfig(use_text=False, ensemble=1, rounds=20), folds=5).summary()
    capped_cells = df[df["capped"]].groupby(["task", "hardware"]).ngroups
    assert s["capped_cells"] == capped_cells
    assert 0.0 <= s["metainf_regret_uncapped"] <= 1.0 and s["oracle_regret_uncapped"] == 0.0


def test_nested_tuning_chooses_per_fold_from_training_rows_only() -> None:
    from scheduler.tuning import Candidate, tune

    df = generate(tasks=16, reps=1, seed=2)
    grid = (Candidate(2, 20, 0.3, "absolute"), Candidate(4, 40, 0.3, "relative"))
    base = PredictorConfig(use_text=False, ensemble=1)
    tuned = tune(df, base, grid, folds=3)
    assert [s["target"] for s in tuned.scores] == ["absolute", "relative"]
    best = min(tuned.scores, key=lambda s: s["inner_regret"])
    assert (tuned.config.max_depth, tuned.config.target) == (best["max_depth"], best["target"])
    seen: list[set[str]] = []

    def choose(train: pd.DataFrame) -> PredictorConfig:
        seen.append(set(train["task"]))
        return tune(train, base, grid, folds=3).config

    result = evaluate(df, "task", base, folds=3, seed=0, choose_config=choose)
    held_out = [set(df["task"]) - tasks for tasks in seen]
    assert len(seen) == 3 and all(held and not (held & tasks) for held, tasks in zip(held_out, seen, strict=True))
    assert sum(result.summary()["fold_configs"].values()) == 3


def test_evaluate_reads_the_committed_methods_benchmark_dataset(capsys: pytest.CaptureFixture[str]) -> None:
    """docs/data/methods_dataset.csv (written by scripts/bench/methods.py) stays readable by `evaluate`.

    The regret figures themselves are benchmark results (docs/benchmarks.md), not asserted here; this checks the
    file is a valid dataset with >= 200 cells over >= 3 profiles and that the learned selector beats random on it.
    """
    dataset = Path(__file__).resolve().parents[1] / "docs" / "data" / "methods_dataset.csv"
    frame = pd.read_csv(dataset)
    assert len(frame) >= 200 and frame["hardware"].nunique() >= 3
    assert main(["evaluate", "--dataset", str(dataset), "--split", "task", "--folds", "4", "--json",
                 *FAST_ARGS]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["cells"] == frame.groupby(["task", "hardware"]).ngroups
    assert summary["metainf_regret"] < summary["random_regret"]
    assert summary["metainf_regret"] < summary["expert_regret"]
