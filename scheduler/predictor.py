"""The meta-predictor f(psi, phi, theta) -> log performance, its feature space and its model files.

- :class:`FeatureSpace` turns dataset rows (training, evaluation) or a live
  request/method/hardware triple (selection) into one float32 vector laid out as
  ``[task block | method block | hardware block]``, so a selection can build the
  matrix of all (method, group) pairs by concatenating precomputed blocks.
- :class:`MetaPredictor` holds a bootstrap ensemble of XGBoost regressors on
  ``log(performance)`` (mean = prediction, spread = uncertainty) and, when the
  data has ``runtime_s``, one regressor on ``log(runtime_s)`` for the cost model.
- :class:`CompiledForest` evaluates all those trees at once with numpy
  (identical results to XGBoost's own predict, to float32 rounding) in about a
  tenth of the time XGBoost needs for a 32-row batch, which is what keeps a
  selection under a millisecond.

Model files: a directory with ``meta.json`` (format, version, feature layout,
text projections, method table, training summary, feature importances) and one
``member-<i>.ubj`` per ensemble member (plus ``runtime.ubj``), written to a
temporary directory and renamed into place.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from proto.methods import METHODS
from proto.records import HardwareInfo
from scheduler.embeddings import (
    TASK_FEATURES,
    TextEncoder,
    TextProjection,
    method_features,
    normalize_text,
)

FORMAT = "dinet-metainf"
FORMAT_VERSION = 1
META_FILE = "meta.json"
FOREST_FILE = "forest.npz"  # the compiled trees (a cache: rebuilt from the members when missing)


class ModelFileError(ValueError):
    """A model directory is missing, incomplete or of an unknown format."""


@dataclass
class PredictorConfig:
    """Hyper-parameters of Algorithm 1 (defaults: seconds to train on a few thousand rows)."""

    ensemble: int = 4  # bootstrap members; their spread is the uncertainty used for exploration
    rounds: int = 60
    max_depth: int = 5
    eta: float = 0.2
    min_child_weight: float = 1.0
    reg_lambda: float = 1.0
    nthread: int = 1  # 1 is fastest at these sizes, and far faster when the machine is busy (OpenMP spin)
    seed: int = 0
    use_text: bool = True  # LM embeddings of task/method/hardware text (when the data has text)
    task_text_dims: int = 4
    method_text_dims: int = 2
    hw_text_dims: int = 2
    text_dropout: float = 0.15  # share of training rows whose text dims are hidden (serving may miss them)
    runtime_rounds: int = 40
    runtime_max_depth: int = 5
    cross_features: bool = True  # products of binary method flags with task meta-features (see FeatureSpace)
    # a text column is embedded only if it tells apart rows that its numeric block does not (see _text_redundant)
    text_if_redundant: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PredictorConfig:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


# ---------------------------------------------------------------- feature space


def _text_col(df: pd.DataFrame, col: str) -> list[str]:
    if col not in df.columns:
        return [""] * len(df)
    return [normalize_text(t) if isinstance(t, str) else "" for t in df[col].tolist()]


def _fill_method_numeric(df: pd.DataFrame, cols: list[str]) -> np.ndarray:
    """``method.*`` values of ``df``, with cells missing from the file filled from ``proto.methods``."""
    out = np.full((len(df), len(cols)), np.nan, np.float32)
    for j, col in enumerate(cols):
        if col in df.columns:
            out[:, j] = df[col].to_numpy(dtype=np.float32, na_value=np.nan)
    known = {name: method_features(name) for name in df["method"].unique() if name in METHODS}
    if known:
        names = df["method"].to_numpy()
        for name, feats in known.items():
            rows = names == name
            for j, col in enumerate(cols):
                if col in feats:
                    block = out[rows, j]
                    block[np.isnan(block)] = feats[col]
                    out[rows, j] = block
    return out


def _text_redundant(texts: list[str], numeric: np.ndarray | None) -> bool:
    """True when every distinct numeric vector of the block comes with at most one text.

    Then the text splits the rows no finer than the numeric features already do,
    and its embedding only adds dimensions to overfit (measured: on a 25-workload
    grid whose ``task_text`` describes the same numbers, the embedding raised the
    leave-one-task-out regret from 0.027 to 0.051). Free-form prompts in telemetry
    are not redundant (many texts share the same lengths and concurrency).
    """
    if numeric is None or numeric.shape[1] == 0:
        return False
    seen: dict[bytes, str] = {}
    rounded = np.where(np.isnan(numeric), np.float32(-1e30), np.round(numeric, 4)).astype(np.float32)
    for row, text in zip(rounded, texts, strict=True):
        if not text:
            continue
        key = row.tobytes()
        first = seen.setdefault(key, text)
        if first != text:
            return False
    return True


@dataclass
class FeatureSpace:
    """Column layout of the feature vector and everything needed to fill it at serving time."""

    task_cols: list[str]
    method_cols: list[str]
    hw_cols: list[str]
    method_ids: list[str] = field(default_factory=list)
    hw_ids: list[str] = field(default_factory=list)
    task_text: TextProjection | None = None
    method_text: TextProjection | None = None
    hw_text: TextProjection | None = None
    method_table: dict[str, list[float]] = field(default_factory=dict)  # name -> whole method block
    cross_flags: list[str] = field(default_factory=list)  # binary method.* columns crossed with ...
    cross_task: list[str] = field(default_factory=list)  # ... these task.* columns
    cross_log: list[bool] = field(default_factory=list)  # per cross_task column: use log2(1 + x)
    text_skipped: list[str] = field(default_factory=list)  # text columns left out as redundant (fit only)

    # -- layout
    @property
    def n_task(self) -> int:
        return len(self.task_cols) + (self.task_text.dims if self.task_text else 0)

    @property
    def n_method(self) -> int:
        return len(self.method_cols) + (self.method_text.dims if self.method_text else 0) + len(self.method_ids)

    @property
    def n_hw(self) -> int:
        return len(self.hw_cols) + (self.hw_text.dims if self.hw_text else 0) + len(self.hw_ids)

    @property
    def n_cross(self) -> int:
        return len(self.cross_flags) * len(self.cross_task)

    @property
    def flag_index(self) -> np.ndarray:
        """Positions of :attr:`cross_flags` inside the method block."""
        return np.array([self.method_cols.index(c) for c in self.cross_flags], np.int64)

    @property
    def cross_task_index(self) -> np.ndarray:
        """Positions of :attr:`cross_task` inside the task block."""
        return np.array([self.task_cols.index(c) for c in self.cross_task], np.int64)

    def cross_task_values(self, task_block: np.ndarray) -> np.ndarray:
        """The task side of the crosses, (..., len(cross_task)); counts on a log2(1 + x) scale."""
        t = task_block[..., self.cross_task_index].astype(np.float32)
        logs = np.asarray(self.cross_log, bool)
        if logs.any():
            t[..., logs] = np.log2(1.0 + np.maximum(t[..., logs], 0.0))
        return t

    def crosses(self, flags: np.ndarray, task_values: np.ndarray) -> np.ndarray:
        """(rows, n_cross) from (rows, n_flags) method flags and (rows or 1, n_task_cross) task values."""
        rows = flags.shape[0]
        if not self.n_cross:
            return np.zeros((rows, 0), np.float32)
        tv = np.broadcast_to(task_values, (rows, task_values.shape[-1]))
        return (flags[:, :, None] * tv[:, None, :]).reshape(rows, self.n_cross).astype(np.float32)

    @property
    def names(self) -> list[str]:
        out = list(self.task_cols)
        out += [f"task.text{i}" for i in range(self.task_text.dims if self.task_text else 0)]
        out += self.method_cols
        out += [f"method.text{i}" for i in range(self.method_text.dims if self.method_text else 0)]
        out += [f"method.id={m}" for m in self.method_ids]
        out += self.hw_cols
        out += [f"hw.text{i}" for i in range(self.hw_text.dims if self.hw_text else 0)]
        out += [f"hw.id={h}" for h in self.hw_ids]
        out += [f"x.{f}*{t}" for f in self.cross_flags for t in self.cross_task]
        return out

    @property
    def uses_text(self) -> bool:
        return any(p is not None for p in (self.task_text, self.method_text, self.hw_text))

    @property
    def serving_missing(self) -> list[str]:
        """Task columns the broker cannot fill at selection time (they are NaN there)."""
        return [c for c in self.task_cols if c not in TASK_FEATURES]

    # -- fitting and batch transform
    @classmethod
    def fit(
        cls, df: pd.DataFrame, config: PredictorConfig, encoder: TextEncoder | None = None
    ) -> FeatureSpace:
        present = [c for c in df.columns if isinstance(c, str)]
        task_cols = [c for c in TASK_FEATURES if c in present]
        task_cols += [c for c in present if c.startswith("task.") and c not in task_cols and df[c].notna().any()]
        method_cols = [c for c in present if c.startswith("method.") and df[c].notna().any()]
        for name in df["method"].unique():
            for key in method_features(name):
                if key not in method_cols:
                    method_cols.append(key)
        hw_cols = [c for c in present if c.startswith("hw.") and df[c].notna().any()]
        space = cls(task_cols=task_cols, method_cols=method_cols, hw_cols=hw_cols)

        method_block = _fill_method_numeric(df, method_cols)
        names = df["method"].to_numpy()
        no_phi = [m for m in sorted(df["method"].unique()) if np.isnan(method_block[names == m]).all()]
        if no_phi:  # some method has no features at all: identify methods by name
            space.method_ids = sorted(df["method"].unique())
        if hw_cols:
            hw_block = df[hw_cols].to_numpy(dtype=np.float32, na_value=np.nan)
            hws = df["hardware"].to_numpy()
            no_theta = [h for h in df["hardware"].unique() if np.isnan(hw_block[hws == h]).all()]
        else:
            no_theta = ["*"]
        if no_theta:
            space.hw_ids = sorted(df["hardware"].unique())

        if config.use_text:
            enc = encoder
            numeric_of = {
                "task_text": df[task_cols].to_numpy(dtype=np.float32, na_value=np.nan) if task_cols else None,
                "method_text": method_block if method_cols else None,
                "hardware_text": df[hw_cols].to_numpy(dtype=np.float32, na_value=np.nan) if hw_cols else None,
            }
            for col, attr, dims in (
                ("task_text", "task_text", config.task_text_dims),
                ("method_text", "method_text", config.method_text_dims),
                ("hardware_text", "hw_text", config.hw_text_dims),
            ):
                row_texts = _text_col(df, col)
                texts = sorted({t for t in row_texts if t})
                if len(texts) < 2 or dims <= 0:
                    continue
                if not config.text_if_redundant and _text_redundant(row_texts, numeric_of[col]):
                    space.text_skipped.append(col)
                    continue
                if enc is None:
                    from scheduler.embeddings import get_encoder

                    enc = get_encoder()
                setattr(space, attr, TextProjection.fit(enc.encode(texts), dims))

        if config.cross_features and task_cols:
            for j, col in enumerate(method_cols):
                vals = method_block[:, j]
                vals = vals[~np.isnan(vals)]
                if len(vals) and np.isin(vals, (0.0, 1.0)).all() and len(np.unique(vals)) == 2:
                    space.cross_flags.append(col)
            if space.cross_flags:
                space.cross_task = list(task_cols)
                space.cross_log = [bool(np.nanmax(np.abs(df[c].to_numpy(dtype=float))) > 1.5) for c in task_cols]

        # method table: the whole method block per method name (what selection uses)
        full = space._method_block(df, encoder)
        for m in sorted(df["method"].unique()):
            rows = full[names == m]
            with np.errstate(all="ignore"):
                vec = np.nanmedian(rows, axis=0) if len(rows) else np.full(space.n_method, np.nan)
            space.method_table[m] = [float(v) for v in vec]
        return space

    def _project(
        self, proj: TextProjection | None, texts: list[str], encoder: TextEncoder | None
    ) -> np.ndarray:
        if proj is None:
            return np.zeros((len(texts), 0), np.float32)
        out = np.full((len(texts), proj.dims), np.nan, np.float32)
        idx = [i for i, t in enumerate(texts) if t]
        if idx:
            if encoder is None:
                from scheduler.embeddings import get_encoder

                encoder = get_encoder()
            out[idx] = proj.project(encoder.encode([texts[i] for i in idx]))
        return out

    def _method_block(self, df: pd.DataFrame, encoder: TextEncoder | None) -> np.ndarray:
        parts = [_fill_method_numeric(df, self.method_cols)]
        parts.append(self._project(self.method_text, _text_col(df, "method_text"), encoder))
        if self.method_ids:
            names = df["method"].to_numpy()
            parts.append(np.stack([(names == m) for m in self.method_ids], 1).astype(np.float32))
        return np.concatenate(parts, 1) if parts else np.zeros((len(df), 0), np.float32)

    def transform(
        self,
        df: pd.DataFrame,
        encoder: TextEncoder | None = None,
        *,
        text_dropout: float = 0.0,
        rng: np.random.Generator | None = None,
    ) -> np.ndarray:
        """(len(df), n_features) float32; missing values are NaN."""
        n = len(df)
        task_num = np.full((n, len(self.task_cols)), np.nan, np.float32)
        for j, col in enumerate(self.task_cols):
            if col in df.columns:
                task_num[:, j] = df[col].to_numpy(dtype=np.float32, na_value=np.nan)
        task_txt = self._project(self.task_text, _text_col(df, "task_text"), encoder)
        hw_num = np.full((n, len(self.hw_cols)), np.nan, np.float32)
        for j, col in enumerate(self.hw_cols):
            if col in df.columns:
                hw_num[:, j] = df[col].to_numpy(dtype=np.float32, na_value=np.nan)
        hw_txt = self._project(self.hw_text, _text_col(df, "hardware_text"), encoder)
        if text_dropout > 0:
            rng = rng or np.random.default_rng(0)
            for block in (task_txt, hw_txt):
                if block.shape[1]:
                    block[rng.random(n) < text_dropout] = np.nan
        method_block = self._method_block(df, encoder)
        parts = [task_num, task_txt, method_block, hw_num, hw_txt]
        if self.hw_ids:
            hws = df["hardware"].to_numpy()
            parts.append(np.stack([(hws == h) for h in self.hw_ids], 1).astype(np.float32))
        if self.n_cross:
            parts.append(self.crosses(method_block[:, self.flag_index], self.cross_task_values(task_num)))
        return np.concatenate(parts, 1).astype(np.float32)

    # -- serving-time blocks
    def task_vector(self, values: dict[str, float], text_embedding: np.ndarray | None) -> np.ndarray:
        vec = np.full(self.n_task, np.nan, np.float32)
        for j, col in enumerate(self.task_cols):
            v = values.get(col)
            if v is not None:
                vec[j] = v
        if self.task_text is not None and text_embedding is not None:
            vec[len(self.task_cols) :] = self.task_text.project(text_embedding)[0]
        return vec

    def method_vector(self, name: str) -> np.ndarray | None:
        """None for a method that is neither in the training data nor in ``proto.methods``."""
        if name in self.method_table:
            return np.asarray(self.method_table[name], np.float32)
        feats = method_features(name)
        if not feats:
            return None
        vec = np.full(self.n_method, np.nan, np.float32)
        for j, col in enumerate(self.method_cols):
            if col in feats:
                vec[j] = feats[col]
        if self.method_ids:
            vec[-len(self.method_ids) :] = 0.0
        return vec

    def hardware_vector(self, group: str, hw: HardwareInfo, text_embedding: np.ndarray | None) -> np.ndarray:
        vec = np.full(self.n_hw, np.nan, np.float32)
        feats = hw.features()
        for j, col in enumerate(self.hw_cols):
            if col in feats:
                vec[j] = feats[col]
        k = len(self.hw_cols)
        if self.hw_text is not None:
            if text_embedding is not None:
                vec[k : k + self.hw_text.dims] = self.hw_text.project(text_embedding)[0]
            k += self.hw_text.dims
        if self.hw_ids:
            vec[k:] = [1.0 if h == group else 0.0 for h in self.hw_ids]
        return vec

    # -- persistence
    def to_dict(self) -> dict[str, Any]:
        return {
            "task_cols": self.task_cols,
            "method_cols": self.method_cols,
            "hw_cols": self.hw_cols,
            "method_ids": self.method_ids,
            "hw_ids": self.hw_ids,
            "task_text": self.task_text.to_dict() if self.task_text else None,
            "method_text": self.method_text.to_dict() if self.method_text else None,
            "hw_text": self.hw_text.to_dict() if self.hw_text else None,
            "method_table": {k: [None if math.isnan(x) else x for x in v] for k, v in self.method_table.items()},
            "cross_flags": self.cross_flags,
            "cross_task": self.cross_task,
            "cross_log": self.cross_log,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FeatureSpace:
        def proj(x: Any) -> TextProjection | None:
            return TextProjection.from_dict(x) if x else None

        return cls(
            task_cols=list(d["task_cols"]),
            method_cols=list(d["method_cols"]),
            hw_cols=list(d["hw_cols"]),
            method_ids=list(d.get("method_ids", [])),
            hw_ids=list(d.get("hw_ids", [])),
            task_text=proj(d.get("task_text")),
            method_text=proj(d.get("method_text")),
            hw_text=proj(d.get("hw_text")),
            method_table={
                k: [math.nan if x is None else float(x) for x in v] for k, v in d.get("method_table", {}).items()
            },
            cross_flags=list(d.get("cross_flags", [])),
            cross_task=list(d.get("cross_task", [])),
            cross_log=[bool(x) for x in d.get("cross_log", [])],
        )


# ---------------------------------------------------------------- compiled forest


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


# ---------------------------------------------------------------- the predictor


@dataclass
class Prediction:
    """Per row: mean and spread of log(performance) over the ensemble, and log(runtime_s) if modelled."""

    mean_log: np.ndarray
    std_log: np.ndarray
    runtime_log: np.ndarray | None

    @property
    def performance(self) -> np.ndarray:
        return np.exp(self.mean_log)


class MetaPredictor:
    """A trained meta-predictor: feature space + bootstrap ensemble (+ runtime model)."""

    def __init__(
        self,
        space: FeatureSpace,
        members: list[Any],
        runtime_model: Any | None,
        config: PredictorConfig,
        *,
        version: str,
        info: dict[str, Any] | None = None,
    ) -> None:
        if not members:
            raise ValueError("a MetaPredictor needs at least one ensemble member")
        self.space = space
        self.members = members
        self.runtime_model = runtime_model
        self.config = config
        self.version = version
        self.info = dict(info or {})
        self._forest: CompiledForest | None = None
        self._names = space.names
        self._importances: dict[str, float] | None = None

    @property
    def feature_names(self) -> list[str]:
        return self._names

    @property
    def forest(self) -> CompiledForest:
        if self._forest is None:
            boosters = [*self.members, *([self.runtime_model] if self.runtime_model is not None else [])]
            self._forest = CompiledForest(boosters, len(self._names))
        return self._forest

    def _split(self, sums: np.ndarray) -> Prediction:
        k = len(self.members)
        perf = sums[:, :k]
        return Prediction(
            mean_log=perf.mean(1),
            std_log=perf.std(1) if k > 1 else np.zeros(len(perf)),
            runtime_log=sums[:, k] if self.runtime_model is not None else None,
        )

    def predict_matrix(self, x: np.ndarray) -> Prediction:
        """Fast path (compiled numpy forest) for feature matrices built by :class:`FeatureSpace`."""
        return self._split(self.forest.member_sums(x))

    def predict_matrix_xgb(self, x: np.ndarray) -> Prediction:
        """The same through XGBoost itself (reference; used by tests and batch evaluation)."""
        cols = [m.inplace_predict(x) for m in self.members]
        if self.runtime_model is not None:
            cols.append(self.runtime_model.inplace_predict(x))
        return self._split(np.stack(cols, 1).astype(np.float64))

    def predict_frame(self, df: pd.DataFrame, encoder: TextEncoder | None = None) -> Prediction:
        return self.predict_matrix_xgb(self.space.transform(df, encoder))

    # -- importances
    def feature_importances(self) -> dict[str, float]:
        """Total gain per feature, averaged over the ensemble and normalised to sum to 1, largest first."""
        if self._importances is not None:
            return dict(self._importances)
        total = np.zeros(len(self._names))
        for m in self.members:
            for key, gain in m.get_score(importance_type="total_gain").items():
                idx = int(key[1:]) if key.startswith("f") and key[1:].isdigit() else self._names.index(key)
                total[idx] += gain
        s = total.sum()
        if s > 0:
            total = total / s
        order = np.argsort(-total)
        self._importances = {self._names[i]: float(total[i]) for i in order if total[i] > 0}
        return dict(self._importances)

    def importance_by_block(self) -> dict[str, float]:
        """Share of the gain carried by psi (task), phi (method), theta (hardware) and method x task crosses."""
        out = {"task": 0.0, "method": 0.0, "hardware": 0.0, "cross": 0.0}
        blocks = {"task.": "task", "method.": "method", "hw.": "hardware", "x.": "cross"}
        for name, v in self.feature_importances().items():
            out[next(b for p, b in blocks.items() if name.startswith(p))] += v
        return out

    # -- persistence
    def save(self, directory: str | Path) -> Path:
        """Write the model directory atomically (a temporary sibling renamed into place)."""
        target = Path(directory)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            files = []
            for i, m in enumerate(self.members):
                name = f"member-{i}.ubj"
                m.save_model(str(tmp / name))
                files.append(name)
            runtime_file = None
            if self.runtime_model is not None:
                runtime_file = "runtime.ubj"
                self.runtime_model.save_model(str(tmp / runtime_file))
            np.savez(tmp / FOREST_FILE, **self.forest.to_arrays())  # type: ignore[arg-type]
            meta = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "version": self.version,
                "saved_at": time.time(),
                "features": self._names,
                "space": self.space.to_dict(),
                "config": self.config.to_dict(),
                "members": files,
                "runtime_model": runtime_file,
                "info": self.info,
                "importances": self.feature_importances(),
            }
            (tmp / META_FILE).write_text(json.dumps(_clean(meta), indent=1, allow_nan=False, default=_json_default))
            if target.exists():
                old = target.with_name(f".{target.name}.old-{os.getpid()}-{time.monotonic_ns()}")
                target.rename(old)
                tmp.rename(target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return target

    @classmethod
    def load(cls, directory: str | Path) -> MetaPredictor:
        import xgboost as xgb

        d = Path(directory)
        meta_path = d / META_FILE
        if not meta_path.exists():
            raise ModelFileError(
                f"{d} is not a MetaInf model directory (no {META_FILE}); create one with "
                "`dinet-scheduler train --dataset FILE --out DIR`"
            )
        try:
            meta = json.loads(meta_path.read_text())
        except ValueError as exc:
            raise ModelFileError(f"{meta_path} is not valid JSON: {exc}") from exc
        if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
            raise ModelFileError(
                f"{d}: model format {meta.get('format')!r} v{meta.get('format_version')} is not "
                f"{FORMAT!r} v{FORMAT_VERSION}; retrain it with this version of dinet"
            )
        members = []
        for name in meta["members"]:
            booster = xgb.Booster()
            try:
                booster.load_model(str(d / name))
            except Exception as exc:
                raise ModelFileError(f"{d / name}: cannot load ensemble member ({exc})") from exc
            members.append(booster)
        runtime = None
        if meta.get("runtime_model"):
            runtime = xgb.Booster()
            runtime.load_model(str(d / meta["runtime_model"]))
        space = FeatureSpace.from_dict(meta["space"])
        if space.names != meta["features"]:
            raise ModelFileError(f"{d}: feature layout in {META_FILE} is inconsistent")
        for booster in [*members, *([runtime] if runtime is not None else [])]:
            booster.set_param({"nthread": 1})
        predictor = cls(
            space, members, runtime, PredictorConfig.from_dict(meta.get("config", {})),
            version=str(meta["version"]), info=meta.get("info", {}),
        )
        if meta.get("importances"):
            predictor._importances = {str(k): float(v) for k, v in meta["importances"].items()}
        forest_path = d / FOREST_FILE
        if forest_path.exists():
            try:
                with np.load(forest_path) as arrays:
                    forest = CompiledForest.from_arrays(dict(arrays))
                expected = len(members) + (runtime is not None)
                if forest.n_features == len(space.names) and forest.n_members == expected:
                    predictor._forest = forest
            except Exception:  # a damaged cache: compile from the members instead
                predictor._forest = None
        return predictor


def _clean(obj: Any) -> Any:
    """JSON-safe copy: non-finite floats become None."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    if isinstance(obj, float | np.floating):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return None if not np.isfinite(obj) else float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


StopCheck = Callable[[], bool]
