"""Step 1 of Algorithm 2: the meta-predictor's prediction for every (method, group) pair of a request.

:class:`PairPredictor` turns a candidate set into a plan (the pairs' method and
hardware blocks, prices and a :class:`~scheduler.binned.PairScorer`; cached per
candidate set, since the directory hands out the same records until it
refreshes), a request into its task block psi (text dims from the background
cache, never waiting), and both into one batched prediction. It is apart from
:class:`~scheduler.selection.MetaInfPolicy`, which turns those predictions into a
decision (cost, budget, reputation, exploration), because it owns a different
state: the compiled trees, the plan and text caches and their counters.
"""

from __future__ import annotations

import math
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np

from scheduler.binned import BinnedForest, PairScorer
from scheduler.embeddings import TASK_FEATURES
from scheduler.expert import repetition
from scheduler.interface import GroupCandidate, RequestFeatures
from scheduler.predictor import MetaPredictor
from scheduler.selection_types import SelectionConfig, _Plan
from scheduler.textcache import BackgroundTextCache, get_background_cache


class PairPredictor:
    """Plans per candidate set, psi per request, and the batched prediction over a plan's pairs."""

    def __init__(
        self, predictor: MetaPredictor, config: SelectionConfig, text_cache: BackgroundTextCache | None = None
    ) -> None:
        self.predictor = predictor
        self.config = config  # ucb_kappa and ucb_cap: the optimistic bonus is memoised with the predictions
        self._space = predictor.space
        if text_cache is None and predictor.space.uses_text:
            text_cache = get_background_cache()
        self.text_cache = text_cache  # where task/hardware text embeddings come from (None: no text)
        self._plans: OrderedDict[Any, _Plan] = OrderedDict()
        self._last_plan: tuple[Any, _Plan] | None = None  # the last complete plan and its key
        self.text_fallbacks = 0  # selections made with NaN text dims because the embedding was not ready
        forest = predictor.forest  # compile the trees now, not on the first request
        self._binned = BinnedForest(forest) if forest.depth <= BinnedForest.MAX_DEPTH else None
        space = self._space
        # where each canonical task feature goes in the task block (the rest stays NaN)
        self._task_slots = [(i, space.task_cols.index(c)) for i, c in enumerate(TASK_FEATURES) if c in space.task_cols]
        self._text_dims: OrderedDict[str, np.ndarray] = OrderedDict()  # task text -> its projected dims

    def _embedding(self, text: str) -> np.ndarray | None:
        if self.text_cache is None or not text:
            return None
        return self.text_cache.lookup(text)

    def plan(self, candidates: Sequence[GroupCandidate]) -> _Plan:
        """The request-independent part of a selection over ``candidates`` (cached once complete)."""
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

    def task_block(self, request: RequestFeatures) -> np.ndarray:
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

    def task_values(self, request: RequestFeatures) -> list[float]:
        """:meth:`task_block` as Python floats holding float32 values (the memo key's input, no numpy)."""
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

    def predict(self, plan: _Plan, requests: Sequence[RequestFeatures]) -> list[tuple[np.ndarray, ...]]:
        """Per request, over the plan's pairs (one batched prediction): mean log tps, spread, tps, runtime, bonus and
        mean log + bonus (see :meth:`_finish`)."""
        space = self._space
        if plan.scorer is not None:  # memo keys straight from Python values: the same bins, no numpy per request
            scorer = plan.scorer
            return scorer.predict_keys([scorer.key(self.task_values(r)) for r in requests])
        tasks = np.stack([self.task_block(r) for r in requests])  # no scorer: walk the compiled trees
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

    def memo_stats(self) -> tuple[int, int]:
        """Prediction memo hits and misses over the cached plans."""
        hits = sum(p.scorer.hits for p in self._plans.values() if p.scorer is not None)
        misses = sum(p.scorer.misses for p in self._plans.values() if p.scorer is not None)
        return hits, misses
