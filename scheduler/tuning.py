"""Hyper-parameters of Algorithm 1 chosen by cross-validation on the training data only.

Why: the right tree depth, number of rounds and target (absolute or cell-relative
log performance) depend on the dataset: a few hundred noisy cells want shallow,
slow-learning trees, thousands of synthetic cells want deeper ones. Choosing them
by the regret on held-out folds would tune on the test data, so :func:`tune` runs
an inner leave-tasks-out evaluation on the rows it is given and nothing else.
Inside ``dinet-scheduler evaluate --tune`` each outer fold tunes on its own
training rows (nested cross-validation); ``dinet-scheduler train --tune`` tunes on
the whole training set.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd

from scheduler.config import PredictorConfig
from scheduler.evaluation import evaluate


@dataclass(frozen=True)
class Candidate:
    """One point of the search grid (the fields of :class:`PredictorConfig` it overrides)."""

    max_depth: int
    rounds: int
    eta: float
    target: str

    def apply(self, base: PredictorConfig) -> PredictorConfig:
        return replace(base, max_depth=self.max_depth, rounds=self.rounds, eta=self.eta, target=self.target)


# small on purpose (every point costs a whole inner cross-validation): deep-and-fast to shallow-and-slow
# trees, each with both targets
DEFAULT_GRID: tuple[Candidate, ...] = tuple(
    Candidate(depth, rounds, eta, target)
    for depth, rounds, eta in ((5, 60, 0.2), (3, 150, 0.1), (2, 250, 0.1))
    for target in ("absolute", "relative")
)


@dataclass
class TuningResult:
    config: PredictorConfig
    scores: list[dict[str, Any]]  # per candidate: its fields and the inner mean regret


def tune(
    df: pd.DataFrame,
    base: PredictorConfig | None = None,
    grid: Sequence[Candidate] = DEFAULT_GRID,
    *,
    split: str = "task",
    folds: int = 4,
    seed: int = 0,
    scoring_ensemble: int = 2,
    log: Callable[[str], None] | None = None,
) -> TuningResult:
    """The grid point with the lowest inner cross-validated MetaInf regret on ``df`` (ties: the earlier one).

    Candidates are scored with at most ``scoring_ensemble`` bootstrap members (the ranking of tree shapes
    does not need all of them, and it keeps nested evaluation affordable); the returned configuration keeps
    ``base``'s ensemble size.

    :raises scheduler.dataset.DatasetError: ``df`` cannot be split (fewer than two tasks, no cell with two methods).
    """
    if not grid:
        raise ValueError("the tuning grid is empty")
    base = base or PredictorConfig()
    scores = []
    scoring = replace(base, ensemble=max(1, min(base.ensemble, scoring_ensemble)))
    for cand in grid:
        result = evaluate(df, split, cand.apply(scoring), folds=folds, seed=seed)
        regret = float(result.regrets("metainf").mean())
        scores.append({**cand.__dict__, "inner_regret": regret})
        if log:
            log(f"  tune: depth {cand.max_depth}, {cand.rounds} rounds, eta {cand.eta}, {cand.target}: "
                f"inner regret {regret:.4f}")
    best = int(np.argmin([s["inner_regret"] for s in scores]))
    return TuningResult(grid[best].apply(base), scores)


def tuned_config_chooser(
    base: PredictorConfig, *, folds: int = 4, log: Callable[[str], None] | None = None
) -> Callable[[pd.DataFrame], PredictorConfig]:
    """For :func:`scheduler.evaluation.evaluate`'s ``choose_config``: tune on each outer fold's training rows."""

    def choose(train: pd.DataFrame) -> PredictorConfig:
        return tune(train, base, folds=folds, log=log).config

    return choose
