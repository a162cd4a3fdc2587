"""The documented long-table format: reading, validation errors, writing, and TimingReport -> row."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from proto.methods import METHODS
from scheduler.dataset import DatasetError, read_dataset, timing_report_to_row, validate_frame, write_dataset
from scheduler.synthetic import CANONICAL_HARDWARE, generate
from tests.scheduler_helpers import report


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_round_trip_csv_and_parquet(tmp_path: Path, suffix: str) -> None:
    df = generate(tasks=4, reps=1, seed=3)
    path = write_dataset(df, tmp_path / f"d{suffix}")
    back = read_dataset(path)
    assert len(back) == len(df)
    assert list(back.columns[:4]) == ["task", "method", "hardware", "performance"]
    assert back["performance"].tolist() == pytest.approx(df["performance"].tolist())
    assert back["task.prompt_tokens"].dtype == float


def test_missing_required_columns_are_named(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    pd.DataFrame({"task": ["a"], "method": ["baseline"], "perf": [1.0]}).to_csv(path, index=False)
    with pytest.raises(DatasetError, match=r"missing required column\(s\) hardware, performance; found: task"):
        read_dataset(path)


def test_unknown_format_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        read_dataset(tmp_path / "nope.csv")
    (tmp_path / "x.txt").write_text("task\n")
    with pytest.raises(DatasetError, match=r"use a \.csv or \.parquet"):
        read_dataset(tmp_path / "x.txt")


def test_cleaning_drops_unusable_rows_and_coerces_numbers() -> None:
    df = pd.DataFrame({
        "task": ["t1", "t1", "t2", "", "t3"],
        "method": ["baseline", "spec_ngram", "baseline", "baseline", "baseline"],
        "hardware": ["h", "h", "h", "h", "h"],
        "performance": [10.0, "n/a", -1.0, 5.0, 7.0],
        "task.prompt_tokens": ["100", "x", None, 3, 4],
        "hw.empty": [None] * 5,
        "task.shared_prefix": [0.5, 0.5, 0.1, 0.0, 0.0],  # alias of task.shared_prefix_ratio
    })
    out = validate_frame(df)
    assert out["task"].tolist() == ["t1", "t3"]
    assert out.attrs["dropped_rows"] == 3
    assert "hw.empty" not in out.columns  # a feature column with no number at all
    assert out["task.prompt_tokens"].tolist() == [100.0, 4.0]
    assert "task.shared_prefix_ratio" in out.columns


def test_no_usable_rows_is_a_clear_error() -> None:
    df = pd.DataFrame({"task": ["a"], "method": ["m"], "hardware": ["h"], "performance": [0.0]})
    with pytest.raises(DatasetError, match="no usable rows"):
        validate_frame(df)


def test_timing_report_becomes_a_row_with_all_embeddings() -> None:
    name, hw = CANONICAL_HARDWARE[0]
    text = "def f(x): return x\n" * 10
    rep = report(group=name, hw=hw, method="spec_ngram", tokens_per_s=42.0, prompt_tokens=300, concurrency=3,
                 text=text)
    row = timing_report_to_row(rep)
    assert row is not None
    assert row["method"] == "spec_ngram" and row["hardware"] == name and row["performance"] == 42.0
    assert row["task.prompt_tokens"] == 300 and row["task.concurrency"] == 3 and row["task.max_new_tokens"] == 256
    assert row["task.repetition"] > 0.5  # repeated code
    assert row["method.spec_ngram"] == 1.0 and row["method.draft_tokens"] == 4.0
    assert row["hw.cpu_cores"] == 2.0 and row["cost_per_hour"] == hw.price_per_hour
    assert row["hardware_text"] == hw.description and row["runtime_s"] > 0
    assert row["task"].startswith("tiny:")
    # the same bytes give the same row
    again = timing_report_to_row(rep.SerializeToString())
    assert again is not None and again["task"] == row["task"]
    # every row converts into a valid frame
    frame = validate_frame(pd.DataFrame([row]))
    assert len(frame) == 1


def test_failed_or_empty_reports_are_not_rows() -> None:
    name, hw = CANONICAL_HARDWARE[0]
    assert timing_report_to_row(report(group=name, hw=hw, method="baseline", tokens_per_s=10.0, ok=False)) is None
    assert timing_report_to_row(report(group=name, hw=hw, method="baseline", tokens_per_s=0.0)) is None
    no_text = timing_report_to_row(report(group=name, hw=hw, method="baseline", tokens_per_s=5.0))
    assert no_text is not None and math.isnan(no_text["task.repetition"]) and ":p128:n256" in no_text["task"]
    assert set(METHODS["baseline"].features()) <= set(no_text)
