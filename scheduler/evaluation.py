"""Evaluation of MetaInf against the oracle and three baselines, holding out whole tasks or hardware.

Folds: the distinct values of the split column (``task`` or ``hardware``) are
held out together -- one value per fold (leave-one-out) when there are at most
``folds`` of them, otherwise ``folds`` groups of values. The meta-predictor is
trained on the other rows only.

Cells: every held-out (task, hardware) pair with at least two measured methods
(repeated measurements of a method are averaged). In each cell every selector
picks one of the measured methods:

- ``oracle``: the measured best;
- ``metainf``: the highest predicted performance (Algorithm 2 without budget);
- ``best_single``: the method with the best mean normalised performance
  (performance / cell best) over the training folds' cells;
- ``expert``: :func:`scheduler.selection.expert_method` on the cell's task features;
- ``random``: a uniform pick, scored by its expectation (no sampling noise).

Metrics per selector: regret = 1 - chosen / oracle performance (averaged over
cells) and top-1 accuracy (chosen is a measured best). When the dataset has a
``planted_best`` column (synthetic data), ``metainf_planted_top1`` is the share
of cells where MetaInf picked the planted winner. When it has a ``capped``
column (runs cut off, performance a lower bound), the cells holding such runs
are counted (``capped_cells``) and every regret is also given over the other
cells (``<selector>_regret_uncapped``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from scheduler.dataset import DatasetError, validate_frame
from scheduler.embeddings import TextEncoder, repetition_score
from scheduler.expert import expert_method
from scheduler.predictor import PredictorConfig
from scheduler.training import train_predictor

SELECTORS = ("metainf", "best_single", "expert", "random", "oracle")


@dataclass
class CellResult:
    fold: int
    task: str
    hardware: str
    methods: int
    oracle: str
    chosen: dict[str, str]
    regret: dict[str, float]
    top1: dict[str, float]
    planted: str = ""
    capped: bool = False  # some measurement of the cell is a lower bound (the run was cut off)


@dataclass
class EvalResult:
    split: str
    folds: int
    rows: int
    cells: list[CellResult]
    skipped_cells: int
    predictions: pd.DataFrame  # held-out rows: task, hardware, method, fold, measured, predicted
    importances: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    configs: list[dict[str, Any]] = field(default_factory=list)  # the configuration each fold trained with

    def regrets(self, selector: str) -> np.ndarray:
        return np.array([c.regret[selector] for c in self.cells])

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"split": self.split, "folds": self.folds, "rows": self.rows, "cells": len(self.cells),
                               "skipped_cells": self.skipped_cells}
        for s in SELECTORS:
            out[f"{s}_regret"] = float(self.regrets(s).mean())
            out[f"{s}_top1"] = float(np.mean([c.top1[s] for c in self.cells]))
        clean = [c for c in self.cells if not c.capped]
        if len(clean) < len(self.cells):
            out["capped_cells"] = len(self.cells) - len(clean)
            for s in SELECTORS:
                out[f"{s}_regret_uncapped"] = float(np.mean([c.regret[s] for c in clean])) if clean else None
        planted = [c for c in self.cells if c.planted]
        if planted:
            out["metainf_planted_top1"] = float(np.mean([c.chosen["metainf"] == c.planted for c in planted]))
        p = self.predictions
        if len(p):
            err = np.log(p["predicted"].to_numpy()) - np.log(p["measured"].to_numpy())
            out["pred_log_rmse"] = float(np.sqrt(np.mean(err**2)))
        out["top_features"] = dict(list(self.importances.items())[:8])
        if self.configs:
            keys = ("target", "max_depth", "rounds", "eta")
            chosen = [",".join(str(c.get(k)) for k in keys) for c in self.configs]
            out["fold_configs"] = {v: chosen.count(v) for v in sorted(set(chosen))}  # target,depth,rounds,eta
        out["seconds"] = round(self.seconds, 2)
        return out


def make_folds(values: list[str], folds: int, seed: int) -> list[list[str]]:
    """Leave-one-out when ``folds <= 0`` or there are at most ``folds`` values, else ``folds`` groups."""
    values = sorted(values)
    if folds <= 0 or len(values) <= folds:
        return [[v] for v in values]
    order = np.random.default_rng(seed).permutation(len(values))
    shuffled = [values[i] for i in order]
    return [sorted(shuffled[i::folds]) for i in range(folds)]


def _num(row: pd.Series, col: str) -> float:
    v = row.get(col, math.nan)
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _best_single_ranking(train: pd.DataFrame) -> list[str]:
    cell = train.groupby(["task", "hardware", "method"], sort=False)["performance"].mean().reset_index()
    cell["best"] = cell.groupby(["task", "hardware"])["performance"].transform("max")
    cell["n"] = cell.groupby(["task", "hardware"])["method"].transform("count")
    cell = cell[cell["n"] >= 2]
    if cell.empty:
        return sorted(train["method"].unique())
    score = (cell["performance"] / cell["best"]).groupby(cell["method"]).mean()
    return [m for m, _ in sorted(score.items(), key=lambda kv: (-kv[1], kv[0]))]


def _expert_pick(first: pd.Series, available: list[str]) -> str:
    rep = _num(first, "task.repetition")
    if math.isnan(rep):
        text = first.get("task_text", "")
        rep = repetition_score(text) if isinstance(text, str) and text else math.nan
    return expert_method(
        _num(first, "task.prompt_tokens"),
        _num(first, "task.max_new_tokens"),
        _num(first, "task.shared_prefix_ratio"),
        _num(first, "task.concurrency"),
        rep,
        available,
    )


def evaluate(
    df: pd.DataFrame,
    split: str = "task",
    config: PredictorConfig | None = None,
    *,
    folds: int = 10,
    seed: int = 0,
    encoder: TextEncoder | None = None,
    log: Callable[[str], None] | None = None,
    choose_config: Callable[[pd.DataFrame], PredictorConfig] | None = None,
) -> EvalResult:
    """Cross-validated comparison of MetaInf with oracle, best single method, expert rules and random.

    ``choose_config`` (nested cross-validation, see :mod:`scheduler.tuning`) picks each fold's
    configuration from that fold's training rows only; the chosen ones are in ``result.configs``.

    :raises DatasetError: bad split, fewer than two values to hold out, or no cell with two methods.
    """
    if split not in ("task", "hardware"):
        raise DatasetError(f"split must be 'task' or 'hardware', not {split!r}")
    started = time.monotonic()
    df = validate_frame(df)
    config = config or PredictorConfig()
    values = sorted(df[split].unique())
    if len(values) < 2:
        raise DatasetError(
            f"--split {split} needs at least two distinct {split} values to hold one out; the dataset has "
            f"{len(values)} ({', '.join(values)})"
        )
    fold_values = make_folds(values, folds, seed)
    cells: list[CellResult] = []
    skipped = 0
    pred_frames = []
    configs: list[dict[str, Any]] = []
    importance_sum: dict[str, float] = {}
    for k, held in enumerate(fold_values):
        test_mask = df[split].isin(held)
        train, test = df[~test_mask], df[test_mask]
        if train.empty or test.empty:
            continue
        if log:
            log(f"fold {k + 1}/{len(fold_values)}: hold out {split} {', '.join(held[:3])}"
                f"{' ...' if len(held) > 3 else ''} ({len(test)} rows), train on {len(train)} rows")
        fold_config = choose_config(train) if choose_config is not None else config
        configs.append(fold_config.to_dict())
        predictor = train_predictor(train, fold_config, encoder=encoder)
        for name, v in predictor.feature_importances().items():
            importance_sum[name] = importance_sum.get(name, 0.0) + v / len(fold_values)
        pred = predictor.predict_frame(test, encoder)
        test = test.assign(_pred_log=pred.mean_log)
        pred_frames.append(
            pd.DataFrame({
                "task": test["task"].to_numpy(), "hardware": test["hardware"].to_numpy(),
                "method": test["method"].to_numpy(), "fold": k,
                "measured": test["performance"].to_numpy(), "predicted": np.exp(pred.mean_log),
            })
        )
        ranking = _best_single_ranking(train)
        for (task, hw), rows in test.groupby(["task", "hardware"], sort=True):
            per = rows.groupby("method", sort=True).agg(perf=("performance", "mean"), pred=("_pred_log", "mean"))
            if len(per) < 2:
                skipped += 1
                continue
            available = per.index.tolist()
            perf = per["perf"]
            oracle_perf = float(perf.max())
            chosen = {
                "oracle": str(perf.idxmax()),
                "metainf": str(per["pred"].idxmax()),
                "best_single": next((m for m in ranking if m in available), available[0]),
                "expert": _expert_pick(rows.iloc[0], available),
            }
            regret = {s: 1.0 - float(perf[m]) / oracle_perf for s, m in chosen.items()}
            top1 = {s: float(perf[m] >= oracle_perf * (1 - 1e-12)) for s, m in chosen.items()}
            ratios = perf.to_numpy() / oracle_perf
            regret["random"] = float(np.mean(1.0 - ratios))
            top1["random"] = float(np.mean(ratios >= 1 - 1e-12))
            chosen["random"] = ""
            planted = ""
            if "planted_best" in rows.columns:
                planted = str(rows["planted_best"].iloc[0])
            capped = bool(rows["capped"].any()) if "capped" in rows.columns else False
            cells.append(
                CellResult(k, str(task), str(hw), len(per), chosen["oracle"], chosen, regret, top1, planted, capped)
            )
    if not cells:
        raise DatasetError(
            "no held-out (task, hardware) cell has two or more measured methods, so there is nothing to choose "
            "between; measure several methods per task and hardware"
        )
    predictions = pd.concat(pred_frames, ignore_index=True) if pred_frames else pd.DataFrame()
    importances = dict(sorted(importance_sum.items(), key=lambda kv: -kv[1]))
    return EvalResult(split, len(fold_values), len(df), cells, skipped, predictions, importances,
                      time.monotonic() - started, configs)


def format_table(result: EvalResult) -> str:
    """A plain-text table: one line per selector."""
    lines = [
        f"split={result.split}  folds={result.folds}  rows={result.rows}  cells={len(result.cells)}"
        f"  (skipped {result.skipped_cells} with one method)",
        f"{'selector':<12} {'regret':>8} {'median':>8} {'p90':>8} {'top-1':>7}",
    ]
    for s in SELECTORS:
        r = result.regrets(s)
        top1 = np.mean([c.top1[s] for c in result.cells])
        lines.append(f"{s:<12} {r.mean():>8.4f} {np.median(r):>8.4f} {np.percentile(r, 90):>8.4f} {top1:>7.3f}")
    summary = result.summary()
    if "capped_cells" in summary:
        clean = len(result.cells) - summary["capped_cells"]
        lines.append(
            f"{summary['capped_cells']} of {len(result.cells)} cells hold capped runs (performance is a lower bound, "
            "so their oracle is uncertain); on the other "
            f"{clean}: " + ", ".join(
                f"{s} {summary[f'{s}_regret_uncapped']:.4f}" for s in SELECTORS[:4]
                if summary[f"{s}_regret_uncapped"] is not None
            )
        )
    if "metainf_planted_top1" in summary:
        lines.append(f"metainf picked the planted best method in {summary['metainf_planted_top1']:.1%} of cells")
    if "pred_log_rmse" in summary:
        lines.append(f"held-out prediction error: log-RMSE {summary['pred_log_rmse']:.3f}")
    if result.importances:
        top = ", ".join(f"{k} {v:.2f}" for k, v in list(result.importances.items())[:6])
        lines.append(f"top features (gain share): {top}")
    return "\n".join(lines)


def write_plots(result: EvalResult, out_dir: str | Path) -> list[Path]:
    """PNG figures: predicted vs measured performance, and the regret distribution per selector."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []

    p = result.predictions
    fig, ax = plt.subplots(figsize=(6, 6))
    for method, rows in p.groupby("method"):
        ax.scatter(rows["measured"], rows["predicted"], s=8, alpha=0.6, label=str(method))
    lo = float(min(p["measured"].min(), p["predicted"].min()))
    hi = float(max(p["measured"].max(), p["predicted"].max()))
    ax.plot([lo, hi], [lo, hi], "k--", lw=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("measured performance")
    ax.set_ylabel("predicted performance (held out)")
    ax.set_title(f"MetaInf, leave-one-{result.split}-out")
    ax.legend(fontsize=7, markerscale=2)
    fig.tight_layout()
    path = out / "predicted_vs_measured.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    fig, ax = plt.subplots(figsize=(7, 4))
    selectors = [s for s in SELECTORS if s != "oracle"]
    ax.boxplot([result.regrets(s) for s in selectors], showmeans=True)
    ax.set_xticks(range(1, len(selectors) + 1), selectors)
    ax.set_ylabel("regret = 1 - chosen / oracle")
    ax.set_title(f"Regret per held-out (task, hardware) cell, split={result.split}")
    fig.tight_layout()
    path = out / "regret_by_selector.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    return written
