"""Per-feature bin -> per-tree leaf mask tables of a tree ensemble (used by :mod:`scheduler.binned`).

Why: every split compares one feature with a threshold, so a tree only sees *which bin*
of its feature's sorted thresholds a value falls in. For each feature and bin
:class:`BinnedForest` precomputes, per tree, the AND of the leaf masks of every node that
sends the value right (the node's left-subtree leaves cannot be the exit leaf). The exit
leaf of a tree is the lowest set bit of the AND over all features (QuickScorer, Lucchese
et al. 2015, evaluated here with numpy over all trees at once).

It is its own module because it is the tables alone, independent of how requests use
them; :class:`~scheduler.binned.PairScorer` (which re-exports it) folds them per
candidate set and memoises per bin vector.
"""

from __future__ import annotations

import bisect

import numpy as np

from scheduler.forest import CompiledForest


class BinnedForest:
    """Per-feature bin -> per-tree leaf mask tables for a :class:`CompiledForest` (depth <= 6)."""

    MAX_DEPTH = 6  # 64 leaves: one uint64 mask per tree

    def __init__(self, forest: CompiledForest) -> None:
        depth = forest.depth
        if depth > self.MAX_DEPTH:
            raise ValueError(f"trees of depth {depth} need more than 64-bit leaf masks")
        self.forest = forest
        self.n_features = nf = forest.n_features
        self.n_trees = nt = forest.n_trees
        self.depth = depth
        self.bits = 32 if depth <= 5 else 64
        self.dtype = np.uint32 if self.bits == 32 else np.uint64
        ones = (1 << (1 << depth)) - 1 if depth < 6 else (1 << 64) - 1
        self.ones = self.dtype(ones)
        # every real node: (feature, default_right, threshold, tree, mask of the leaves it keeps when going right)
        feats, rights, thrs, trees, masks = [], [], [], [], []
        for d in range(depth):
            width = 1 << d
            f = forest._feat[d].reshape(nt, width).astype(np.int64)
            t = forest._thr[d].reshape(nt, width)
            span = 1 << (depth - d)  # leaves under a node of this level
            for i in range(width):
                real = np.isfinite(t[:, i])  # pass-through nodes (threshold +inf) always go left
                if not real.any():
                    continue
                left = ((1 << (span // 2)) - 1) << (i * span)
                tree_ids = np.flatnonzero(real)
                feats.append(f[tree_ids, i] % nf)
                rights.append(f[tree_ids, i] >= nf)
                thrs.append(t[tree_ids, i])
                trees.append(tree_ids)
                masks.append(np.full(len(tree_ids), ones ^ left, dtype=object))
        feat = np.concatenate(feats) if feats else np.zeros(0, np.int64)
        right = np.concatenate(rights) if rights else np.zeros(0, bool)
        thr = np.concatenate(thrs).astype(np.float32) if thrs else np.zeros(0, np.float32)
        tree = np.concatenate(trees) if trees else np.zeros(0, np.int64)
        mask = np.concatenate(masks).astype(self.dtype) if masks else np.zeros(0, self.dtype)

        # per feature: sorted distinct thresholds; table rows [bin 0 .. bin k, NaN]
        self.thresholds: list[np.ndarray] = []
        self._thr_lists: list[list[float]] = []
        self.offsets = np.zeros(nf + 1, np.int64)
        blocks = []
        for j in range(nf):
            sel = feat == j
            th = np.unique(thr[sel])
            k = len(th)
            self.thresholds.append(th)
            self._thr_lists.append([float(v) for v in th])
            block = np.full((k + 2, nt), self.ones, self.dtype)
            if k:
                # a node with threshold th[r] sends values of bin >= r + 1 right
                rank = np.searchsorted(th, thr[sel]) + 1
                np.bitwise_and.at(block, (rank, tree[sel]), mask[sel])
                block[: k + 1] = np.bitwise_and.accumulate(block[: k + 1], axis=0)
                nan_sel = right[sel]
                np.bitwise_and.at(block, (np.full(nan_sel.sum(), k + 1), tree[sel][nan_sel]), mask[sel][nan_sel])
            blocks.append(block)
            self.offsets[j + 1] = self.offsets[j] + k + 2
        self.table = np.concatenate(blocks) if blocks else np.zeros((0, nt), self.dtype)
        self.used = np.array([len(th) > 0 for th in self.thresholds], bool)
        self._leaf_base = (np.arange(nt, dtype=np.intp) << depth) - 1
        ends = np.append(forest.starts[1:], nt)
        self._member_matrix = np.zeros((nt, len(forest.starts)), np.float32)
        for i, (a, z) in enumerate(zip(forest.starts, ends, strict=True)):
            self._member_matrix[a:z, i] = 1.0

    @property
    def nbytes(self) -> int:
        return int(self.table.nbytes)

    def row(self, feature: int, value: float) -> int:
        """Table row of ``value`` for ``feature`` (one value; bisect on a list is the fastest scalar path)."""
        if value != value:  # NaN
            return int(self.offsets[feature + 1]) - 1
        return int(self.offsets[feature]) + bisect.bisect_right(self._thr_lists[feature], value)

    def rows(self, feature: int, values: np.ndarray) -> np.ndarray:
        """Table rows of many values of one feature."""
        values = np.asarray(values, np.float32)
        out = np.searchsorted(self.thresholds[feature], values, side="right").astype(np.intp)
        out += int(self.offsets[feature])
        out[np.isnan(values)] = int(self.offsets[feature + 1]) - 1
        return out

    def masks(self, x: np.ndarray) -> np.ndarray:
        """(rows, n_trees) leaf masks of whole feature rows (used to fold the fixed part of pairs)."""
        x = np.asarray(x, np.float32)
        idx = np.stack([self.rows(j, x[:, j]) for j in range(self.n_features) if self.used[j]], 1)
        return np.bitwise_and.reduce(self.table[idx], axis=1)

    def sums(self, masks: np.ndarray) -> np.ndarray:
        """(..., n_members) raw member predictions from (..., n_trees) leaf masks.

        The exit leaf is the lowest set bit: ``popcount(m ^ (m - 1)) - 1`` (the -1 is in ``_leaf_base``).
        """
        low = np.bitwise_count(masks ^ (masks - self.dtype(1)))
        values = self.forest._leaf.take(self._leaf_base + low)
        out = (values @ self._member_matrix).astype(np.float64)  # BLAS sum per member: far cheaper than reduceat
        out += self.forest.bases
        return out

    def member_sums(self, x: np.ndarray) -> np.ndarray:
        """Same as :meth:`CompiledForest.member_sums` (reference path, whole rows)."""
        return self.sums(self.masks(x))
