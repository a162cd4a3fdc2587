"""The data of Algorithm 2 (:mod:`scheduler.selection`): its knobs, a candidate set's plan, a request's scores.

They live apart from :class:`~scheduler.selection.MetaInfPolicy` (which re-exports
:class:`SelectionConfig` and :class:`ScoredPairs`) because they are plain records that
callers build or read (configs, explanations, tests) without the selection logic.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from scheduler.binned import PairScorer


@dataclass(frozen=True)
class SelectionConfig:
    """Knobs of Algorithm 2 (see the module docstring)."""

    epsilon: float = 0.05  # share of decisions that explore (0 = pure exploitation)
    min_ratio: float = 0.25  # never explore a pair predicted slower than this share of the best
    ucb_kappa: float = 0.5  # optimistic bonus = min(kappa * std of log prediction, cap)
    ucb_cap: float = 0.05
    reputation_weight: float = 1.0
    min_reputation: float = 1e-3
    explore_priorities: tuple[str, ...] = ("normal", "batch")


@dataclass
class _Plan:
    """The request-independent part of a batch: one row per (method, group) pair."""

    methods: list[str]
    group_idx: np.ndarray  # pair -> index into candidates
    block: np.ndarray  # (pairs, n_method + n_hw) float32
    price_per_s: np.ndarray  # (pairs,)
    flags: np.ndarray  # (pairs, n_cross_flags): the method side of the method x task crosses
    complete: bool  # False while a hardware text embedding is still being computed
    scorer: PairScorer | None  # the pairs' fixed features folded into leaf masks (None: walk the trees)
    groups: list[str]  # pair -> group name
    all_feasible: np.ndarray  # (pairs,) all True, read-only: the feasibility of every pair without a budget


@dataclass
class ScoredPairs:
    """Everything Algorithm 2 computed for one request (for explanations, tests and logs)."""

    methods: list[str]
    groups: list[str]
    tokens_per_s: np.ndarray
    std_log: np.ndarray
    runtime_s: np.ndarray
    cost: np.ndarray
    feasible: np.ndarray
    score: np.ndarray
