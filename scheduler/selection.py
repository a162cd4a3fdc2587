"""Algorithm 2 (online selection under a budget) and the expert rules used at cold start.

:class:`MetaInfPolicy` scores every (method, consumer group) pair of a request in
one batched prediction of the meta-predictor, then

1. predicts throughput ``tps = exp(mean log performance)`` and the runtime
   (the runtime model, or ``max_new_tokens / tps``); cost = group price per
   hour / 3600 x runtime;
2. drops the pairs whose cost exceeds the request's budget (budget 0 = no
   limit) and raises :class:`proto.errors.BudgetTooLowError` when none is left;
3. weighs by reputation: ``score = mean_log + w * log(reputation)`` (a group at
   reputation 0.5 counts as half as fast), plus a small optimistic bonus
   ``min(kappa * std, cap)`` from the ensemble's spread (UCB with a cap);
4. picks the best score; with probability ``epsilon`` (never for "high"
   priority) it instead explores: a random feasible pair, weighted by its
   uncertainty, among those predicted at least ``min_ratio`` as fast as the
   best. The paper's selection is pure exploitation and never learns what it
   does not try; this keeps exploration bounded in rate and in predicted loss.

:meth:`MetaInfPolicy.select_many` does this for a whole window of requests at once:
requests with the same candidate set share one batched prediction. Step 1 (plans,
the request's features, the batched prediction) is done by
:class:`~scheduler.pair_predictor.PairPredictor` in scheduler/pair_predictor.py; this
module makes the decision from it. The cold-start :class:`ExpertRulesPolicy` lives in
scheduler/expert.py (re-exported here), the data (:class:`SelectionConfig`,
:class:`ScoredPairs`, the per-candidate-set plan) in scheduler/selection_types.py (also
re-exported).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from proto.errors import BudgetTooLowError
from scheduler.expert import ExpertRules, ExpertRulesPolicy, check_budget, expert_method, no_candidates
from scheduler.interface import GroupCandidate, RequestFeatures, SchedulingPolicy, Selection
from scheduler.pair_predictor import PairPredictor
from scheduler.predictor import MetaPredictor
from scheduler.selection_types import ScoredPairs, SelectionConfig, _Plan
from scheduler.textcache import BackgroundTextCache

__all__ = ["ExpertRules", "ExpertRulesPolicy", "MetaInfPolicy", "ScoredPairs", "SelectionConfig", "expert_method"]

# ---------------------------------------------------------------- MetaInf


class MetaInfPolicy(SchedulingPolicy):
    """Algorithm 2 over a trained :class:`~scheduler.predictor.MetaPredictor`."""

    name = "metainf"
    batches = True

    def __init__(
        self,
        predictor: MetaPredictor,
        config: SelectionConfig | None = None,
        *,
        seed: int | None = None,
        text_cache: BackgroundTextCache | None = None,
    ) -> None:
        self.predictor = predictor
        self.config = config or SelectionConfig()
        self._rng = random.Random(seed)
        self.pairs = PairPredictor(predictor, self.config, text_cache)  # step 1; compiles the trees now
        self._fallback = ExpertRulesPolicy()
        self.decisions = 0
        self.explorations = 0

    @classmethod
    def load(cls, path: str | Path, config: SelectionConfig | None = None, *, seed: int | None = None) -> MetaInfPolicy:
        return cls(MetaPredictor.load(path), config, seed=seed)

    @property
    def model_version(self) -> str:
        return self.predictor.version

    @property
    def text_cache(self) -> BackgroundTextCache | None:
        """Where task/hardware text embeddings come from (None when the model uses no text)."""
        return self.pairs.text_cache

    @property
    def text_fallbacks(self) -> int:
        """Selections made with NaN text dims because the embedding was not ready."""
        return self.pairs.text_fallbacks

    def _scored(
        self, plan: _Plan, request: RequestFeatures, candidates: Sequence[GroupCandidate], pred: tuple[np.ndarray, ...]
    ) -> ScoredPairs:
        """Steps 2-3 of Algorithm 2 from the plan's prediction for this request."""
        _, std_log, tps, runtime_pred, _, score = pred
        # runtime: the runtime model, or (without runtime_s in the data) output tokens / predicted tokens/s
        runtime = runtime_pred if self.predictor.runtime_model is not None else max(1, request.max_new_tokens) / tps
        cost = plan.price_per_s * runtime
        feasible = cost <= request.budget if request.budget > 0 else plan.all_feasible
        cfg = self.config
        log_reps = [math.log(max(c.reputation, cfg.min_reputation)) for c in candidates]
        if cfg.reputation_weight and any(log_reps):
            score = score + cfg.reputation_weight * np.asarray(log_reps)[plan.group_idx]
        return ScoredPairs(plan.methods, plan.groups, tps, std_log, runtime, cost, feasible, score)

    def score(self, request: RequestFeatures, candidates: Sequence[GroupCandidate]) -> ScoredPairs:
        """Steps 1-3 of Algorithm 2 for every pair (no exploration, no error when nothing fits)."""
        plan = self.pairs.plan(candidates)
        if not plan.methods:
            empty = np.zeros(0)
            return ScoredPairs([], [], empty, empty, empty, empty, np.zeros(0, bool), empty)
        return self._scored(plan, request, candidates, self.pairs.predict(plan, [request])[0])

    def select(self, request: RequestFeatures, candidates: Sequence[GroupCandidate]) -> Selection:
        """:meth:`select_many` for one request, without its window bookkeeping (the broker's default path)."""
        if not candidates:
            raise no_candidates(request)
        check_budget(request.budget)
        pairs = self.pairs
        plan = pairs.plan(candidates)
        if not plan.methods:  # no method the model can describe: the rules decide
            return self._fallback.select(request, candidates)
        pred = pairs.predict(plan, [request])[0]
        return self._pick(request, self._scored(plan, request, candidates, pred))

    def select_many(
        self, items: Sequence[tuple[RequestFeatures, Sequence[GroupCandidate]]]
    ) -> list[Selection | Exception]:
        """Algorithm 2 for a window of requests; one batched prediction per distinct candidate set.

        A request that cannot be served gets its typed error in its slot; the others are unaffected.
        """
        out: list[Selection | Exception | None] = [None] * len(items)
        pairs = self.pairs
        batches: dict[int, tuple[_Plan, list[int]]] = {}
        for i, (request, candidates) in enumerate(items):
            try:
                if not candidates:
                    raise no_candidates(request)
                check_budget(request.budget)
                plan = pairs.plan(candidates)
                if not plan.methods:  # no method the model can describe: the rules decide
                    out[i] = self._fallback.select(request, candidates)
                    continue
            except Exception as error:
                out[i] = error
                continue
            batches.setdefault(id(plan), (plan, []))[1].append(i)
        for plan, idx in batches.values():
            try:
                preds: list[Any] = pairs.predict(plan, [items[i][0] for i in idx])
            except Exception:  # a request the batch cannot take: find it, so that it fails alone
                preds = []
                for i in idx:
                    try:
                        preds.append(pairs.predict(plan, [items[i][0]])[0])
                    except Exception as error:
                        preds.append(error)
            for i, pred in zip(idx, preds, strict=True):
                request, candidates = items[i]
                try:
                    if isinstance(pred, Exception):
                        raise pred
                    out[i] = self._pick(request, self._scored(plan, request, candidates, pred))
                except Exception as error:
                    out[i] = error
        return out  # type: ignore[return-value]

    def _pick(self, request: RequestFeatures, s: ScoredPairs) -> Selection:
        """Steps 4-5: the best feasible pair, or (bounded exploration) a plausible other one."""
        if not s.feasible.any():
            i = int(np.argmin(s.cost))
            raise BudgetTooLowError(
                f"budget {request.budget:g} is below the predicted cost of every (method, group) pair; the "
                f"cheapest is {s.methods[i]} on {s.groups[i]} at {s.cost[i]:.3g}. Raise the budget or send 0 "
                "for no limit"
            )
        # without a budget every pair is feasible (_scored): no mask to apply
        pick = int(np.argmax(np.where(s.feasible, s.score, -np.inf) if request.budget > 0 else s.score))
        explored = False
        cfg = self.config
        if cfg.epsilon > 0 and request.priority in cfg.explore_priorities and self._rng.random() < cfg.epsilon:
            mean_log = np.log(s.tokens_per_s)
            eligible = s.feasible & (mean_log >= mean_log[pick] + math.log(max(cfg.min_ratio, 1e-9)))
            eligible[pick] = False
            idx = np.flatnonzero(eligible)
            if len(idx):
                weights = (s.std_log[idx] + 0.02).tolist()
                pick = int(self._rng.choices(idx.tolist(), weights=weights)[0])
                explored = True
                self.explorations += 1
        self.decisions += 1
        return Selection(
            method=s.methods[pick],
            group=s.groups[pick],
            scheduler=self.name,
            model_version=self.predictor.version,
            predicted_tokens_per_s=float(s.tokens_per_s[pick]),
            predicted_cost=float(s.cost[pick]),
            exploration=explored,
        )

    def serving_stats(self) -> dict[str, int]:
        """Counters for `dinet-broker status` and the broker benchmark."""
        hits, misses = self.pairs.memo_stats()
        return {"decisions": self.decisions, "explorations": self.explorations, "text_fallbacks": self.text_fallbacks,
                "prediction_memo_hits": hits, "prediction_memo_misses": misses}

    def explain(self, request: RequestFeatures, candidates: Sequence[GroupCandidate]) -> list[dict[str, Any]]:
        """Every pair with its prediction, cost and score, best first (for logs and debugging)."""
        s = self.score(request, candidates)
        rows = [
            {
                "method": m, "group": g, "tokens_per_s": float(t), "std_log": float(sd), "runtime_s": float(r),
                "cost": float(c), "feasible": bool(f), "score": float(sc),
            }
            for m, g, t, sd, r, c, f, sc in zip(
                s.methods, s.groups, s.tokens_per_s, s.std_log, s.runtime_s, s.cost, s.feasible, s.score, strict=True
            )
        ]
        return sorted(rows, key=lambda r: (not r["feasible"], -r["score"]))
