"""Tree ensembles evaluated by leaf bitmasks per feature bin: the selection path's predictor.

Why: in the broker loop a selection scores every (method, group) pair, 32 rows for
8 methods x 4 groups, and level-by-level tree walking (:class:`~scheduler.forest.CompiledForest`)
costs 7-20 µs per row on the 2-core VM. But within one selection only the task part
of the rows changes; the method and hardware parts are fixed per candidate set. So:

- Every split compares one feature with a threshold, so a tree only sees *which bin*
  of its feature's sorted thresholds a value falls in. For each feature and bin we
  precompute, per tree, the AND of the leaf masks of every node that sends the value
  right (the node's left-subtree leaves cannot be the exit leaf). The exit leaf of a
  tree is the lowest set bit of the AND over all features (QuickScorer, Lucchese et
  al. 2015, evaluated here with numpy over all trees at once).
- :class:`PairScorer` folds the fixed features of each pair into one mask per
  (pair, tree) when the candidate set is first seen. Per request it looks up the
  bins of the task features only (and of the method-flag x task crosses, which are
  either the task value or zero), ANDs a few rows, and reads the leaves.
- The result is a function of those bins alone, so it is memoised per bin vector:
  exact, not an approximation (requests in the same bins get the same prediction
  from the trees anyway).

Results equal CompiledForest's to float32 rounding (tested), NaN following each
node's default direction as in XGBoost. The tables are :class:`BinnedForest`'s
(:mod:`scheduler.binned_forest`, re-exported here); this module holds the per-candidate-set
scorer.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from scheduler.binned_forest import BinnedForest


class PairScorer:
    """Scores one candidate set's (method, group) pairs for many requests (see the module docstring).

    The feature layout is FeatureSpace's: ``[task (n_task) | fixed block (nb) | crosses]`` where cross
    ``(k, j)`` (column ``n_task + nb + k * n_ct + j``) is ``flag_k * g_j``: the pair's binary method flag
    times the request's task value ``g_j`` on the cross scale. A flag of 1 makes it ``g_j``, a flag of 0
    makes it ``0`` (NaN when ``g_j`` is), any other flag value (NaN) makes it NaN.
    """

    def __init__(
        self,
        binned: BinnedForest,
        n_task: int,
        block: np.ndarray,
        flags: np.ndarray,
        *,
        finish: Callable[[np.ndarray], tuple[np.ndarray, ...]] | None = None,
        memo_size: int = 4096,
        cross_values: Callable[[np.ndarray], np.ndarray] | None = None,
        cross_index: Sequence[int] = (),
    ) -> None:
        """``finish`` turns (k, pairs, n_members) sums into per-request arrays (k, ...) worth memoising.

        ``cross_values`` (FeatureSpace.cross_task_values: (k, n_task) -> (k, n_ct), elementwise per column) and
        ``cross_index`` (the task column behind each g_j) enable :meth:`predict_one`, the single-request path.
        """
        self.binned = b = binned
        self._finish = finish or (lambda sums: (sums,))
        self.n_task = n_task
        pairs, nb = block.shape
        n_flags = flags.shape[1]
        n_cross = b.n_features - n_task - nb
        if n_cross < 0 or (n_flags and n_cross % n_flags) or (not n_flags and n_cross):
            raise ValueError("the pair block and the method flags do not match the forest's feature count")
        self.n_ct = n_ct = n_cross // n_flags if n_flags else 0
        self.n_flags = n_flags
        self.pairs = pairs
        c0 = n_task + nb
        self.cross_cols = [[c0 + k * n_ct + j for j in range(n_ct)] for k in range(n_flags)]
        on = flags == 1.0
        off = flags == 0.0
        # fixed part of every pair: its block, and crosses whose flag is neither 0 nor 1 (always NaN)
        base = np.full((pairs, b.n_trees), b.ones, b.dtype)
        for p in range(pairs):
            idx = [b.row(n_task + j, float(block[p, j])) for j in range(nb) if b.used[n_task + j]]
            idx += [b.row(c, float("nan")) for k in range(n_flags) if not (on[p, k] or off[p, k])
                    for c in self.cross_cols[k] if b.used[c]]
            if idx:
                base[p] = np.bitwise_and.reduce(b.table[np.asarray(idx, np.intp)], axis=0)
        self.base = base
        # flag patterns (one per method, in practice): which flags are on, which are off
        self.state = np.where(on, 0, np.where(off, 1, 2)).astype(np.int8) if pairs else np.zeros((0, n_flags), np.int8)
        if pairs and n_flags:
            patterns, inverse = np.unique(self.state, axis=0, return_inverse=True)
        else:
            patterns, inverse = np.full((1, n_flags), 2, np.int8), np.zeros(pairs, np.intp)
        self.patterns = patterns
        self.pattern_of = np.asarray(inverse, np.intp).reshape(-1)
        # per pattern, the flags that are on, padded with index n_flags (the all-ones row)
        on_flags = [[k for k in range(n_flags) if pat[k] == 0] for pat in patterns]
        width = max((len(f) for f in on_flags), default=0)
        self._on_index = np.full((len(patterns), width + 1), n_flags, np.intp)  # >= 1 pad slot (task features)
        for gi, ks in enumerate(on_flags):
            self._on_index[gi, : len(ks)] = ks
        # g_j is compared with the thresholds of every cross (k, j): one bisect into their union finds them all
        self._task_thr = [b._thr_lists[j] for j in range(n_task)]
        self._task_nan = [len(t) + 1 for t in self._task_thr]  # bin index of NaN (its table row is last)
        self._task_offsets = b.offsets[:n_task].astype(np.intp)
        self._union: list[list[float]] = []
        self._union_rows: list[np.ndarray] = []  # j -> (len(union) + 2, F) table rows; the last is NaN
        for j in range(n_ct):
            cols = [self.cross_cols[k][j] for k in range(n_flags)]
            union = np.unique(np.concatenate([b.thresholds[c] for c in cols]))
            rows = np.empty((len(union) + 2, n_flags), np.intp)
            for k, c in enumerate(cols):
                # a value in union bin i >= 1 lies in [union[i-1], union[i]): it passes the thresholds <= union[i-1]
                counts = np.searchsorted(b.thresholds[c], union, side="right")
                rows[0, k] = b.offsets[c]
                rows[1 : len(union) + 1, k] = b.offsets[c] + counts
                rows[-1, k] = b.offsets[c + 1] - 1
            self._union.append([float(v) for v in union])
            self._union_rows.append(rows)
        # the same as Python lists, for one request at a time: task offsets, and per g_j and union bin the
        # rows of its F crosses
        self._task_offset_list = [int(v) for v in self._task_offsets]
        self._union_row_lists = [rows.tolist() for rows in self._union_rows]
        self._off_masks: dict[bytes, np.ndarray] = {}  # NaN pattern of g -> (G, T) masks of the "off" crosses
        self._ones_row = np.full((1, b.n_trees), b.ones, b.dtype)
        # single-request path: per g_j, task value -> union bin, filled by the caller's own cross_values
        self._cross_values = cross_values
        self._cross_index = [int(c) for c in cross_index]
        if cross_values is not None and len(self._cross_index) != n_ct:
            raise ValueError(f"cross_index names {len(self._cross_index)} task columns, the crosses use {n_ct}")
        self._cross_bins: list[dict[float, int]] = [{} for _ in range(n_ct)]
        self._memo: OrderedDict[tuple[int, ...], tuple[np.ndarray, ...]] = OrderedDict()
        self._memo_size = memo_size
        self.hits = 0
        self.misses = 0

    def _off(self, nan: np.ndarray) -> np.ndarray:
        """(G, T): per pattern, the AND over its flag-0 crosses, whose value is 0, or NaN where g_j is NaN."""
        key = nan.tobytes()
        got = self._off_masks.get(key)
        if got is None:
            b = self.binned
            got = np.full((len(self.patterns), b.n_trees), b.ones, b.dtype)
            for gi, pat in enumerate(self.patterns):
                idx = [b.row(c, float("nan") if nan[j] else 0.0) for k in range(self.n_flags) if pat[k] == 1
                       for j, c in enumerate(self.cross_cols[k])]
                if idx:
                    got[gi] = np.bitwise_and.reduce(b.table[np.asarray(idx, np.intp)], axis=0)
            self._off_masks[key] = got
        return got

    def _bins(self, task: np.ndarray, g: np.ndarray) -> list[tuple[int, ...]]:
        """Per request: the bin of every task feature, then the union bin of every g_j (NaN: the last bin).

        The trees' output is a function of these bins alone, so they are the memo key.
        """
        if task.shape[0] == 1:  # scalar bisects beat numpy calls on one value
            out = [nan if v != v else bisect.bisect_right(th, v)
                   for v, th, nan in zip(task[0].tolist(), self._task_thr, self._task_nan, strict=True)]
            out += [len(u) + 1 if v != v else bisect.bisect_right(u, v)
                    for v, u in zip(g[0].tolist(), self._union, strict=True)]
            return [tuple(out)]
        cols = []
        for j, th in enumerate(self.binned.thresholds[: self.n_task]):
            col = np.searchsorted(th, task[:, j], side="right")
            col[np.isnan(task[:, j])] = self._task_nan[j]
            cols.append(col)
        for j, u in enumerate(self._union):
            col = np.searchsorted(np.asarray(u, np.float32), g[:, j], side="right")
            col[np.isnan(g[:, j])] = len(u) + 1
            cols.append(col)
        return [tuple(r) for r in np.stack(cols, 1).tolist()]

    def _rows(self, bins: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(k, n_task + F * n_ct) table rows (task features, then crosses with their flag on, k-major) and the
        (k, n_ct) NaN pattern of g, from (k, n_task + n_ct) bins."""
        k = bins.shape[0]
        nt = self.n_task
        rows = np.empty((k, nt + self.n_flags * self.n_ct), np.intp)
        rows[:, :nt] = self._task_offsets + bins[:, :nt]
        nan = np.zeros((k, self.n_ct), bool)
        for j, table in enumerate(self._union_rows):
            ub = bins[:, nt + j]
            rows[:, nt + j : nt + self.n_flags * self.n_ct : self.n_ct] = table[ub]
            nan[:, j] = ub == len(table) - 1
        return rows, nan

    CROSS_CACHE = 8192  # distinct task values remembered per g_j (then the cache starts over)

    def key(self, task: Sequence[float]) -> tuple[int, ...]:
        """The memo key (what :meth:`_bins` gives) of one request, from its task block as Python floats
        that are float32 values (e.g. ``array('f', values).tolist()``).

        Why: for one request the numpy calls of building the block and ``cross_values`` cost more than
        the trees' lookups. The bins of g_j are cached per task value, each computed by ``cross_values``
        itself on a one-row block, so the key is the one the array path computes, bit for bit.
        """
        cross = self._cross_values
        if cross is None:
            raise RuntimeError("this PairScorer was built without cross_values; use predict(task, g)")
        out = [nan if v != v else bisect.bisect_right(th, v)
               for v, th, nan in zip(task, self._task_thr, self._task_nan, strict=True)]
        for j, col in enumerate(self._cross_index):
            v = task[col]
            if v != v:  # NaN stays NaN on the cross scale (max and log2 propagate it)
                out.append(len(self._union[j]) + 1)
                continue
            got = self._cross_bins[j].get(v)
            if got is None:
                got = self._cross_bin(j, col, v, cross)
            out.append(got)
        return tuple(out)

    def _cross_bin(self, j: int, col: int, value: float, cross: Callable[[np.ndarray], np.ndarray]) -> int:
        row = np.full((1, self.n_task), np.nan, np.float32)
        row[0, col] = value
        g = float(cross(row)[0, j])
        got = len(self._union[j]) + 1 if g != g else bisect.bisect_right(self._union[j], g)
        cache = self._cross_bins[j]
        if len(cache) >= self.CROSS_CACHE:
            cache.clear()
        cache[value] = got
        return got

    def predict_one(self, task: Sequence[float]) -> tuple[np.ndarray, ...]:
        """:meth:`predict` for one request given as :meth:`key` takes it (no numpy on a memo hit)."""
        return self.predict_keys([self.key(task)])[0]

    def predict(self, task: np.ndarray, g: np.ndarray) -> list[tuple[np.ndarray, ...]]:
        """Per request, ``finish`` applied to its (pairs, n_members) sums; memoised per bin vector.

        ``task``: (k, n_task) float32 task blocks; ``g``: (k, n_ct) their values on the cross scale.
        """
        return self.predict_keys(self._bins(task, g))

    def predict_keys(self, keys: list[tuple[int, ...]]) -> list[tuple[np.ndarray, ...]]:
        """Per memo key (bin vector), ``finish`` applied to its (pairs, n_members) sums."""
        k = len(keys)
        out: list[tuple[np.ndarray, ...] | None] = [None] * k
        todo = []
        memo = self._memo
        for i, key in enumerate(keys):
            hit = memo.get(key)
            if hit is None:
                todo.append(i)
            else:
                memo.move_to_end(key)
                out[i] = hit
        self.hits += k - len(todo)
        if todo:
            self.misses += len(todo)
            if len(todo) == 1 and self.n_flags:
                sums = self._compute_one(keys[todo[0]])
            else:
                sums = self._compute(*self._rows(np.array([keys[i] for i in todo], np.intp)))
            finished = self._finish(sums)
            for n, i in enumerate(todo):
                result = tuple(a[n] for a in finished)
                out[i] = result
                if self._memo_size:
                    memo[keys[i]] = result
            while len(memo) > self._memo_size:
                memo.popitem(last=False)
        return out  # type: ignore[return-value]

    def sums(self, task: np.ndarray, g: np.ndarray) -> np.ndarray:
        """(k, pairs, n_members) raw member predictions (with the default ``finish``)."""
        return np.stack([r[0] for r in self.predict(task, g)])

    def _compute(self, rows: np.ndarray, nan: np.ndarray) -> np.ndarray:
        b = self.binned
        k = rows.shape[0]
        table = b.table
        nt = self.n_task
        # (k, T): AND over the task features; contiguous (slots, k, T) gathers reduce fast over axis 0
        task_mask = np.bitwise_and.reduce(table[rows[:, :nt].T], axis=0)
        if not self.n_flags:
            return b.sums(self.base[None] & task_mask[:, None, :])
        on_rows = table[rows[:, nt:].T].reshape(self.n_flags, self.n_ct, k, b.n_trees)
        on_flag = np.empty((self.n_flags + 1, k, b.n_trees), b.dtype)  # per flag, AND over its crosses
        np.bitwise_and.reduce(on_rows, axis=1, out=on_flag[: self.n_flags])
        on_flag[self.n_flags] = task_mask  # the pad slot of every pattern carries the task features
        pattern = np.bitwise_and.reduce(on_flag[self._on_index], axis=1)  # (G, k, T), task features included
        for i in range(k):
            pattern[:, i] &= self._off(nan[i])
        masks = pattern.transpose(1, 0, 2)[:, self.pattern_of]  # (k, P, T)
        masks &= self.base
        return b.sums(masks)

    def _compute_one(self, key: tuple[int, ...]) -> np.ndarray:
        """:meth:`_compute` of ``_rows`` for one memo key, with a third of the numpy calls (one gather of every
        table row the request selects, rows built from Python lists). The masks AND the same rows, so the
        leaves, and the sums, are the ones :meth:`_compute` finds."""
        b = self.binned
        nt, n_ct, n_flags = self.n_task, self.n_ct, self.n_flags
        rows = [off + k for off, k in zip(self._task_offset_list, key[:nt], strict=True)]
        nan = []
        for j, table in enumerate(self._union_row_lists):
            ub = key[nt + j]
            rows += table[ub]  # flag-major below: row nt + j * F + k is cross (k, j)
            nan.append(ub == len(table) - 1)
        got = b.table[rows]  # (nt + n_ct * F, T)
        on_flag = np.empty((n_flags + 1, b.n_trees), b.dtype)
        np.bitwise_and.reduce(got[nt:].reshape(n_ct, n_flags, b.n_trees), axis=0, out=on_flag[:n_flags])
        np.bitwise_and.reduce(got[:nt], axis=0, out=on_flag[n_flags])  # the pad slot: the task features
        pattern = np.bitwise_and.reduce(on_flag[self._on_index], axis=1)  # (G, T)
        pattern &= self._off(np.asarray(nan, bool))
        masks = pattern[self.pattern_of]  # (P, T)
        masks &= self.base
        return b.sums(masks[None])

    def stats(self) -> dict[str, Any]:
        return {"memo_hits": self.hits, "memo_misses": self.misses, "memo_size": len(self._memo)}
