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

:class:`ExpertRulesPolicy` is the cold-start policy (no model yet); its rules are
documented in :func:`expert_method` and docs/scheduler.md.
"""

from __future__ import annotations

import math
import random
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from proto.errors import BudgetInvalidError, BudgetTooLowError, UnknownModelError
from proto.methods import DEFAULT_METHOD
from scheduler.binned import BinnedForest, PairScorer
from scheduler.embeddings import TASK_FEATURES, repetition_score
from scheduler.interface import GroupCandidate, RequestFeatures, SchedulingPolicy, Selection
from scheduler.predictor import MetaPredictor
from scheduler.textcache import BackgroundTextCache, get_background_cache

_repetition = lru_cache(maxsize=4096)(repetition_score)


def _no_candidates(request: RequestFeatures) -> UnknownModelError:
    return UnknownModelError(
        f"no live consumer group serves model {request.model!r}; start a node with "
        f"`dinet-node run --model {request.model}` or check `dinet-broker status`"
    )


def _check_budget(budget: float) -> None:
    if not math.isfinite(budget) or budget < 0:
        raise BudgetInvalidError(f"budget must be a finite number >= 0 (0 = unlimited), got {budget!r}")


# ---------------------------------------------------------------- expert rules


@dataclass(frozen=True)
class ExpertRules:
    """Thresholds of the documented expert rules (docs/scheduler.md, "Expert rules")."""

    prefix_ratio: float = 0.5  # rule 1: shared prefix ratio at least this ...
    prefix_min_prompt: int = 256  # ... on a prompt at least this long -> prefix_caching
    concurrency: int = 4  # rule 2: this many requests in flight -> continuous_batching
    long_prompt: int = 1024  # rule 3: prompts at least this long -> chunked_prefill
    long_output: int = 128  # rule 4: outputs at least this long ...
    repetition: float = 0.3  # ... on text at least this repetitive -> spec_ngram


def expert_method(
    prompt_tokens: float,
    max_new_tokens: float,
    shared_prefix_ratio: float,
    concurrency: float,
    repetition: float,
    available: Sequence[str],
    rules: ExpertRules = ExpertRules(),
) -> str:
    """The expert rules: the first rule that fires and whose method is available, else baseline.

    1. prefix caching when ``shared_prefix_ratio >= 0.5`` and ``prompt_tokens >= 256``;
    2. continuous batching when ``concurrency >= 4``;
    3. chunked prefill when ``prompt_tokens >= 1024``;
    4. prompt-lookup speculative decoding (spec_ngram) when ``max_new_tokens >= 128``
       and ``repetition >= 0.3`` (repeated word trigrams in the task text);
    5. otherwise baseline (or, when baseline is not available, the first available method).

    Missing (NaN) values never fire a rule.
    """

    def ge(x: float, t: float) -> bool:
        return x is not None and not math.isnan(x) and x >= t

    wanted: list[str] = []
    if ge(shared_prefix_ratio, rules.prefix_ratio) and ge(prompt_tokens, rules.prefix_min_prompt):
        wanted.append("prefix_caching")
    if ge(concurrency, rules.concurrency):
        wanted.append("continuous_batching")
    if ge(prompt_tokens, rules.long_prompt):
        wanted.append("chunked_prefill")
    if ge(max_new_tokens, rules.long_output) and ge(repetition, rules.repetition):
        wanted.append("spec_ngram")
    wanted.append(DEFAULT_METHOD)
    for method in wanted:
        if method in available:
            return method
    return sorted(available)[0] if available else DEFAULT_METHOD


class ExpertRulesPolicy(SchedulingPolicy):
    """Cold start: a method from :func:`expert_method`, then the best group that can run it.

    Group choice: among groups under the budget, those able to run the rule's
    method first, then the highest ``reputation x measured GFLOP/s``, then the
    most nodes. Without a model there is no runtime prediction, so the cost of a
    pair is estimated as ``price x max_new_tokens / ASSUMED_TOKENS_PER_S``.
    """

    name = "expert-rules"
    ASSUMED_TOKENS_PER_S = 20.0

    def __init__(self, rules: ExpertRules | None = None) -> None:
        self.rules = rules or ExpertRules()

    def select(self, request: RequestFeatures, candidates: Sequence[GroupCandidate]) -> Selection:
        if not candidates:
            raise _no_candidates(request)
        _check_budget(request.budget)
        rep = _repetition(request.task_text) if request.task_text else math.nan
        args = (request.prompt_tokens, request.max_new_tokens, request.shared_prefix_ratio, request.concurrency, rep)
        all_methods = sorted({m for c in candidates for m in c.methods})
        preferred = expert_method(*args, all_methods, self.rules)
        runtime = max(1, request.max_new_tokens) / self.ASSUMED_TOKENS_PER_S
        best: tuple[Any, ...] | None = None
        cheapest = math.inf
        for c in candidates:
            cost = c.hardware.price_per_hour / 3600.0 * runtime
            cheapest = min(cheapest, cost)
            if request.budget > 0 and cost > request.budget:
                continue
            method = preferred if preferred in c.methods else expert_method(*args, c.methods, self.rules)
            key = (method == preferred, c.reputation * max(c.hardware.gflops, 1.0), len(c.nodes), c.group)
            if best is None or key > best[0]:
                best = (key, c, method, cost)
        if best is None:
            raise BudgetTooLowError(
                f"budget {request.budget:g} is below the estimated cost of every group (cheapest "
                f"{cheapest:.3g}); raise the budget or send 0 for no limit"
            )
        _, group, method, cost = best
        return Selection(method=method, group=group.group, scheduler=self.name, predicted_cost=cost)


# ---------------------------------------------------------------- MetaInf


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


class MetaInfPolicy(SchedulingPolicy):
    """Algorithm 2 over a trained :class:`~scheduler.predictor.MetaPredictor`."""

    name = "metainf"

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
            scorer = PairScorer(self._binned, space.n_task, block, flags, finish=self._finish)
        plan = _Plan(methods, np.asarray(groups, np.int64), block, np.asarray(prices, np.float64), flags, complete,
                     scorer, [candidates[i].group for i in groups])
        if complete:
            self._plans[key] = plan
            self._last_plan = (key, plan)
            while len(self._plans) > 64:
                self._plans.popitem(last=False)
        return plan

    def _finish(self, sums: np.ndarray) -> tuple[np.ndarray, ...]:
        """(k, pairs, members) sums -> mean log tps, its spread, tps, predicted runtime (NaN without a
        runtime model) and the optimistic bonus, each (k, pairs): everything request-independent given the bins."""
        pred = self.predictor.split(sums)
        mean_log, std_log = pred.mean_log, pred.std_log
        runtime = np.exp(pred.runtime_log) if pred.runtime_log is not None else np.full_like(mean_log, np.nan)
        bonus = np.minimum(self.config.ucb_kappa * std_log, self.config.ucb_cap)
        return mean_log, std_log, np.exp(mean_log), runtime, bonus

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
            _repetition(text) if text else math.nan,
        )
        vec = np.full(space.n_task, np.nan, np.float32)
        for i, j in self._task_slots:
            vec[j] = values[i]
        if space.task_text is not None and text:
            dims = self._task_dims(text)
            if dims is not None:
                vec[len(space.task_cols) :] = dims
        return vec

    def score(self, request: RequestFeatures, candidates: Sequence[GroupCandidate]) -> ScoredPairs:
        """Steps 1-3 of Algorithm 2 for every pair (no exploration, no error when nothing fits)."""
        plan = self._plan(candidates)
        n = len(plan.methods)
        if n == 0:
            empty = np.zeros(0)
            return ScoredPairs([], [], empty, empty, empty, empty, np.zeros(0, bool), empty)
        space = self._space
        task = self._task_block(request)
        if plan.scorer is not None:
            mean_log, std_log, tps, runtime_pred, bonus = plan.scorer.predict(
                task[None], space.cross_task_values(task)[None])[0]
        else:
            nb = plan.block.shape[1]
            x = np.empty((n, space.n_task + nb + space.n_cross), np.float32)
            x[:, : space.n_task] = task
            x[:, space.n_task : space.n_task + nb] = plan.block
            if space.n_cross:
                x[:, space.n_task + nb :] = space.crosses(plan.flags, space.cross_task_values(task))
            mean_log, std_log, tps, runtime_pred, bonus = (a[0] for a in self._finish(
                self.predictor.forest.member_sums(x)[None]))
        # runtime: the runtime model, or (without runtime_s in the data) output tokens / predicted tokens/s
        runtime = runtime_pred if self.predictor.runtime_model is not None else max(1, request.max_new_tokens) / tps
        cost = plan.price_per_s * runtime
        feasible = cost <= request.budget if request.budget > 0 else np.ones(n, bool)
        cfg = self.config
        log_reps = [math.log(max(c.reputation, cfg.min_reputation)) for c in candidates]
        score = mean_log + bonus
        if cfg.reputation_weight and any(log_reps):
            score = score + cfg.reputation_weight * np.asarray(log_reps)[plan.group_idx]
        return ScoredPairs(
            methods=plan.methods,
            groups=plan.groups,
            tokens_per_s=tps,
            std_log=std_log,
            runtime_s=runtime,
            cost=cost,
            feasible=feasible,
            score=score,
        )

    def select(self, request: RequestFeatures, candidates: Sequence[GroupCandidate]) -> Selection:
        if not candidates:
            raise _no_candidates(request)
        _check_budget(request.budget)
        s = self.score(request, candidates)
        if not len(s.methods):  # no method the model can describe: fall back to the rules
            return self._fallback.select(request, candidates)
        if not s.feasible.any():
            i = int(np.argmin(s.cost))
            raise BudgetTooLowError(
                f"budget {request.budget:g} is below the predicted cost of every (method, group) pair; the "
                f"cheapest is {s.methods[i]} on {s.groups[i]} at {s.cost[i]:.3g}. Raise the budget or send 0 "
                "for no limit"
            )
        masked = np.where(s.feasible, s.score, -np.inf)
        pick = int(np.argmax(masked))
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
