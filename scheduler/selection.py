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
requests with the same candidate set share one batched prediction. The cold-start
:class:`ExpertRulesPolicy` lives in scheduler/expert.py (re-exported here), the data
(:class:`SelectionConfig`, :class:`ScoredPairs`, the per-candidate-set plan) in
scheduler/selection_types.py (also re-exported).
"""

from __future__ import annotations

import math
import random
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from proto.errors import BudgetTooLowError
from scheduler.binned import BinnedForest, PairScorer
from scheduler.embeddings import TASK_FEATURES
from scheduler.expert import ExpertRules, ExpertRulesPolicy, check_budget, expert_method, no_candidates, repetition
from scheduler.interface import GroupCandidate, RequestFeatures, SchedulingPolicy, Selection
from scheduler.predictor import MetaPredictor
from scheduler.selection_types import ScoredPairs, SelectionConfig, _Plan
from scheduler.textcache import BackgroundTextCache, get_background_cache

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
        self._space = predictor.space
        if text_cache is None and predictor.space.uses_text:
            text_cache = get_background_cache()
        self._text = text_cache
        self._plans: OrderedDict[Any, _Plan] = OrderedDict()
        self._last_plan: tuple[Any, _Plan] | None = None  # the last complete plan and its key
        self._fallback = ExpertRulesPolicy()
        self.decisions = 0
        self.explorations = 0
        self.text_fallbacks = 0  # selections made with NaN text dims because the embedding was not ready
        forest = predictor.forest  # compile the trees now, not on the first request
        self._binned = BinnedForest(forest) if forest.depth <= BinnedForest.MAX_DEPTH else None
        space = self._space
        # where each canonical task feature goes in the task block (the rest stays NaN)
        self._task_slots = [(i, space.task_cols.index(c)) for i, c in enumerate(TASK_FEATURES) if c in space.task_cols]
        self._text_dims: OrderedDict[str, np.ndarray] = OrderedDict()  # task text -> its projected dims

    @classmethod
    def load(cls, path: str | Path, config: SelectionConfig | None = None, *, seed: int | None = None) -> MetaInfPolicy:
        return cls(MetaPredictor.load(path), config, seed=seed)

    @property
    def model_version(self) -> str:
        return self.predictor.version

    @property
    def text_cache(self) -> BackgroundTextCache | None:
        """Where task/hardware text embeddings come from (None when the model uses no text)."""
        return self._text

    def _embedding(self, text: str) -> np.ndarray | None:
        if self._text is None or not text:
            return None
        return self._text.lookup(text)

    def _plan(self, candidates: Sequence[GroupCandidate]) -> _Plan:
        last = self._last_plan
        # the directory hands out the same hardware records until it refreshes: compare by identity first
        if last is not None and len(last[0]) == len(candidates) and all(
            g == c.group and h is c.hardware and m is c.methods
            for (g, h, m), c in zip(last[0], candidates, strict=True)
        ):
            return last[1]
        key = tuple((c.group, c.hardware, c.methods) for c in candidates)
        plan = self._plans.get(key)
        if plan is not None:
            self._plans.move_to_end(key)
            self._last_plan = (key, plan)
            return plan
        space = self._space
        rows, methods, groups, prices = [], [], [], []
        complete = True
        for gi, c in enumerate(candidates):
            emb = None
            if space.hw_text is not None and c.hardware.description:
                emb = self._embedding(c.hardware.description)
                complete &= emb is not None
            hw_vec = space.hardware_vector(c.group, c.hardware, emb)
            for m in c.methods:
                m_vec = space.method_vector(m)
                if m_vec is None:
                    continue
                rows.append(np.concatenate([m_vec, hw_vec]))
                methods.append(m)
                groups.append(gi)
                prices.append(c.hardware.price_per_hour / 3600.0)
        block = np.stack(rows).astype(np.float32) if rows else np.zeros((0, space.n_method + space.n_hw), np.float32)
        flags = block[:, space.flag_index] if space.n_cross else np.zeros((len(rows), 0), np.float32)
        scorer = None
        if self._binned is not None and rows:
            scorer = PairScorer(self._binned, space.n_task, block, flags, finish=self._finish,
                                cross_values=space.cross_task_values, cross_index=space.cross_task_index.tolist())
        all_feasible = np.ones(len(rows), bool)
        all_feasible.flags.writeable = False
        plan = _Plan(methods, np.asarray(groups, np.int64), block, np.asarray(prices, np.float64), flags, complete,
                     scorer, [candidates[i].group for i in groups], all_feasible)
        if complete:
            self._plans[key] = plan
            self._last_plan = (key, plan)
            while len(self._plans) > 64:
                self._plans.popitem(last=False)
        return plan

    def _finish(self, sums: np.ndarray) -> tuple[np.ndarray, ...]:
        """(k, pairs, members) sums -> mean log tps, its spread, tps, predicted runtime (NaN without a
        runtime model), the optimistic bonus and mean log + bonus (the score before reputation), each
        (k, pairs): everything request-independent given the bins, so memoised with them."""
        pred = self.predictor.split(sums)
        mean_log, std_log = pred.mean_log, pred.std_log
        runtime = np.exp(pred.runtime_log) if pred.runtime_log is not None else np.full_like(mean_log, np.nan)
        bonus = np.minimum(self.config.ucb_kappa * std_log, self.config.ucb_cap)
        return mean_log, std_log, np.exp(mean_log), runtime, bonus, mean_log + bonus

    def _task_dims(self, text: str) -> np.ndarray | None:
        """Projected LM dims of a task text, or None (then NaN, which training's text dropout prepared for).

        Never waits: a text not embedded yet is queued for the background encoder and this
        selection goes without it (counted in :attr:`text_fallbacks`).
        """
        dims = self._text_dims.get(text)
        if dims is not None:
            return dims
        proj = self._space.task_text
        emb = self._embedding(text)
        if emb is None or proj is None:
            self.text_fallbacks += 1
            return None
        dims = proj.project(emb)[0].astype(np.float32)
        self._text_dims[text] = dims
        if len(self._text_dims) > 20000:
            self._text_dims.popitem(last=False)
        return dims

    def _task_block(self, request: RequestFeatures) -> np.ndarray:
        """psi for one request, laid out as FeatureSpace.task_vector would (NaN where unknown)."""
        space = self._space
        text = request.task_text
        values = (
            request.prompt_tokens, request.max_new_tokens, request.shared_prefix_ratio, request.concurrency,
            repetition(text) if text else math.nan,
        )
        vec = np.full(space.n_task, np.nan, np.float32)
        for i, j in self._task_slots:
            vec[j] = values[i]
        if space.task_text is not None and text:
            dims = self._task_dims(text)
            if dims is not None:
                vec[len(space.task_cols) :] = dims
        return vec

    def _task_values(self, request: RequestFeatures) -> list[float]:
        """:meth:`_task_block` as Python floats holding float32 values (the memo key's input, no numpy)."""
        space = self._space
        text = request.task_text
        values = (
            request.prompt_tokens, request.max_new_tokens, request.shared_prefix_ratio, request.concurrency,
            repetition(text) if text else math.nan,
        )
        vec = [math.nan] * space.n_task
        for i, j in self._task_slots:
            vec[j] = values[i]
        if space.task_text is not None and text:
            dims = self._task_dims(text)
            if dims is not None:
                vec[len(space.task_cols) :] = dims.tolist()
        return array("f", vec).tolist()  # C float casts: the values a float32 block holds

    def _predict(self, plan: _Plan, requests: Sequence[RequestFeatures]) -> list[tuple[np.ndarray, ...]]:
        """Per request, over the plan's pairs (one batched prediction): mean log tps, spread, tps, runtime, bonus and
        mean log + bonus (see :meth:`_finish`)."""
        space = self._space
        if plan.scorer is not None:  # memo keys straight from Python values: the same bins, no numpy per request
            scorer = plan.scorer
            return scorer.predict_keys([scorer.key(self._task_values(r)) for r in requests])
        tasks = np.stack([self._task_block(r) for r in requests])  # no scorer: walk the compiled trees
        g = space.cross_task_values(tasks)
        n, nb, k = len(plan.methods), plan.block.shape[1], len(requests)
        x = np.empty((k, n, space.n_task + nb + space.n_cross), np.float32)
        x[:, :, : space.n_task] = tasks[:, None]
        x[:, :, space.n_task : space.n_task + nb] = plan.block
        for i in range(k):
            if space.n_cross:
                x[i, :, space.n_task + nb :] = space.crosses(plan.flags, g[i])
        sums = self.predictor.forest.member_sums(x.reshape(k * n, -1)).reshape(k, n, -1)
        finished = self._finish(sums)
        return [tuple(a[i] for a in finished) for i in range(k)]

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
        plan = self._plan(candidates)
        if not plan.methods:
            empty = np.zeros(0)
            return ScoredPairs([], [], empty, empty, empty, empty, np.zeros(0, bool), empty)
        return self._scored(plan, request, candidates, self._predict(plan, [request])[0])

    def select(self, request: RequestFeatures, candidates: Sequence[GroupCandidate]) -> Selection:
        """:meth:`select_many` for one request, without its window bookkeeping (the broker's default path)."""
        if not candidates:
            raise no_candidates(request)
        check_budget(request.budget)
        plan = self._plan(candidates)
        if not plan.methods:  # no method the model can describe: the rules decide
            return self._fallback.select(request, candidates)
        pred = self._predict(plan, [request])[0]
        return self._pick(request, self._scored(plan, request, candidates, pred))

    def select_many(
        self, items: Sequence[tuple[RequestFeatures, Sequence[GroupCandidate]]]
    ) -> list[Selection | Exception]:
        """Algorithm 2 for a window of requests; one batched prediction per distinct candidate set.

        A request that cannot be served gets its typed error in its slot; the others are unaffected.
        """
        out: list[Selection | Exception | None] = [None] * len(items)
        batches: dict[int, tuple[_Plan, list[int]]] = {}
        for i, (request, candidates) in enumerate(items):
            try:
                if not candidates:
                    raise no_candidates(request)
                check_budget(request.budget)
                plan = self._plan(candidates)
                if not plan.methods:  # no method the model can describe: the rules decide
                    out[i] = self._fallback.select(request, candidates)
                    continue
            except Exception as error:
                out[i] = error
                continue
            batches.setdefault(id(plan), (plan, []))[1].append(i)
        for plan, idx in batches.values():
            try:
                preds: list[Any] = self._predict(plan, [items[i][0] for i in idx])
            except Exception:  # a request the batch cannot take: find it, so that it fails alone
                preds = []
                for i in idx:
                    try:
                        preds.append(self._predict(plan, [items[i][0]])[0])
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
        hits = sum(p.scorer.hits for p in self._plans.values() if p.scorer is not None)
        misses = sum(p.scorer.misses for p in self._plans.values() if p.scorer is not None)
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
