"""XGBoost trees compiled to numpy arrays: the prediction step of a selection in a fraction of a millisecond.

XGBoost's own ``predict`` costs about 1 ms for a 32-row batch over a few boosters,
the whole selection budget. :class:`CompiledForest` evaluates every tree of every
booster at once, level by level, with numpy gathers, and gives the same results
(to float32 rounding; tested).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np


def _base_score(booster: Any) -> float:
    config = json.loads(booster.save_config())
    raw = config["learner"]["learner_model_param"]["base_score"]
    return float(str(raw).strip("[]"))


class CompiledForest:
    """All trees of several boosters as padded complete binary trees, evaluated level by level in numpy.

    A node's feature index points into ``[x with NaN -> -inf | x with NaN -> +inf]``
    so a missing value follows the node's default direction with a single comparison
    (``x >= threshold`` goes right, as in XGBoost).
    """

    def __init__(self, boosters: list[Any], n_features: int) -> None:
        trees: list[dict[str, Any]] = []
        member_of: list[int] = []
        self.bases = np.array([_base_score(b) for b in boosters], np.float64)
        for i, booster in enumerate(boosters):
            model = json.loads(booster.save_raw("json"))
            member_trees = model["learner"]["gradient_booster"]["model"]["trees"]
            trees.extend(member_trees)
            member_of.extend([i] * len(member_trees))
        self.n_features = n_features
        self.n_members = len(boosters)
        self.n_trees = len(trees)
        # members' trees are contiguous: reduceat over these starts sums each member
        counts = np.bincount(np.asarray(member_of, np.int64), minlength=self.n_members)
        if (counts == 0).any():
            raise ValueError("every booster needs at least one tree")
        self.starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)

        def depth(t: dict[str, Any], node: int = 0) -> int:
            if t["left_children"][node] == -1:
                return 0
            return 1 + max(depth(t, t["left_children"][node]), depth(t, t["right_children"][node]))

        self.depth = max(1, max((depth(t) for t in trees), default=1))
        d_max = self.depth
        n_inner = 2**d_max - 1
        feat = np.zeros((self.n_trees, n_inner), np.int32)
        thr = np.full((self.n_trees, n_inner), np.inf, np.float32)
        leaf = np.zeros((self.n_trees, 2**d_max), np.float32)
        for ti, t in enumerate(trees):
            left, right = t["left_children"], t["right_children"]
            split, cond, default_left = t["split_indices"], t["split_conditions"], t["default_left"]
            stack = [(0, 0, 0)]
            while stack:
                node, pos, level = stack.pop()
                if left[node] == -1:
                    if level == d_max:
                        leaf[ti, pos - n_inner] = cond[node]
                        continue
                    # a shallow leaf: pass-through node (feature 0 with NaN -> -inf, threshold +inf: always left)
                    # whose both children repeat the leaf
                    feat[ti, pos], thr[ti, pos] = 0, np.inf
                    stack.append((node, 2 * pos + 1, level + 1))
                    stack.append((node, 2 * pos + 2, level + 1))
                    continue
                feat[ti, pos] = int(split[node]) + (0 if default_left[node] else n_features)
                thr[ti, pos] = cond[node]
                stack.append((left[node], 2 * pos + 1, level + 1))
                stack.append((right[node], 2 * pos + 2, level + 1))
        # level-major flat arrays: level d holds (n_trees, 2^d) nodes
        self._feat = [feat[:, 2**d - 1 : 2 ** (d + 1) - 1].ravel().copy() for d in range(d_max)]
        self._thr = [thr[:, 2**d - 1 : 2 ** (d + 1) - 1].ravel().copy() for d in range(d_max)]
        self._leaf = leaf.ravel().copy()
        self._tidx = np.arange(self.n_trees, dtype=np.int32)
        self._prepare()

    def _prepare(self) -> None:
        """Index arrays in numpy's native index type (no conversion per gather), per-level tree offsets."""
        self._ifeat = [f.astype(np.intp) for f in self._feat]
        self._tofs = [np.arange(self.n_trees, dtype=np.intp) * (2**d) for d in range(self.depth + 1)]

    def to_arrays(self) -> dict[str, np.ndarray]:
        out = {"bases": self.bases, "starts": self.starts, "leaf": self._leaf,
               "shape": np.array([self.n_features, self.n_members, self.n_trees, self.depth], np.int64)}
        for d in range(self.depth):
            out[f"feat{d}"] = self._feat[d]
            out[f"thr{d}"] = self._thr[d]
        return out

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> CompiledForest:
        """Rebuild without parsing the trees again (a saved model loads in milliseconds)."""
        forest = cls.__new__(cls)
        n_features, n_members, n_trees, depth = (int(v) for v in arrays["shape"])
        forest.n_features, forest.n_members, forest.n_trees, forest.depth = n_features, n_members, n_trees, depth
        forest.bases = np.asarray(arrays["bases"], np.float64)
        forest.starts = np.asarray(arrays["starts"], np.int64)
        forest._leaf = np.asarray(arrays["leaf"], np.float32)
        forest._feat = [np.asarray(arrays[f"feat{d}"], np.int32) for d in range(depth)]
        forest._thr = [np.asarray(arrays[f"thr{d}"], np.float32) for d in range(depth)]
        forest._tidx = np.arange(n_trees, dtype=np.int32)
        forest._prepare()
        return forest

    def member_sums(self, x: np.ndarray) -> np.ndarray:
        """(n_rows, n_members) raw predictions (for our models: log targets)."""
        x = np.ascontiguousarray(x, np.float32)
        n, nf = x.shape
        if nf != self.n_features:
            raise ValueError(f"expected {self.n_features} features, got {nf}")
        nan = np.isnan(x)
        both = np.empty((n, 2 * nf), np.float32)
        both[:, :nf] = np.where(nan, -np.inf, x)
        both[:, nf:] = np.where(nan, np.inf, x)
        flat = both.ravel()
        row_off = (np.arange(n, dtype=np.intp) * (2 * nf))[:, None]
        feat, thr = self._ifeat, self._thr
        # level 0: one node per tree, the same for every row
        j = (flat.take(feat[0] + row_off) >= thr[0]).astype(np.intp)
        for d in range(1, self.depth):
            g = self._tofs[d] + j
            values = flat.take(feat[d].take(g) + row_off)
            j <<= 1
            j += values >= thr[d].take(g)
        leaves = self._leaf.take(self._tofs[self.depth] + j)
        return np.add.reduceat(leaves, self.starts, axis=1, dtype=np.float64) + self.bases[None, :]
