"""The feature vector of the meta-predictor: psi (task), phi (method), theta (hardware) and their crosses.

:class:`FeatureSpace` turns dataset rows (training, evaluation) or a live
request/method/hardware triple (selection) into one float32 vector laid out as
``[task block | method block | hardware block | method x task crosses]``, so a
selection can build the matrix of all (method, group) pairs from precomputed
blocks. See docs/scheduler.md, "Embeddings".

This module holds the layout itself (column lists, text projections, crosses),
the serving-time vectors the broker builds per request, and persistence. Fitting
a layout to a meta-training frame and filling matrices from frames (pandas, used
by training and evaluation only) live in scheduler/feature_frames.py, behind
:meth:`FeatureSpace.fit` and :meth:`FeatureSpace.transform`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
import pandas as pd

from proto.records import HardwareInfo
from scheduler.config import PredictorConfig
from scheduler.embeddings import TASK_FEATURES, TextEncoder, TextProjection, hardware_features, method_features
from scheduler.feature_frames import fit_space, transform_frame


@lru_cache(maxsize=64)
def _positions(cols: tuple[str, ...], wanted: tuple[str, ...]) -> np.ndarray:
    """Read-only index array (cached: the selection path asks for it on every request)."""
    out = np.array([cols.index(c) for c in wanted], np.int64)
    out.flags.writeable = False
    return out


@lru_cache(maxsize=64)
def _log_positions(flags: tuple[bool, ...]) -> np.ndarray:
    out = np.flatnonzero(np.asarray(flags, bool))
    out.flags.writeable = False
    return out


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
        return _positions(tuple(self.method_cols), tuple(self.cross_flags))

    @property
    def cross_task_index(self) -> np.ndarray:
        """Positions of :attr:`cross_task` inside the task block."""
        return _positions(tuple(self.task_cols), tuple(self.cross_task))

    def cross_task_values(self, task_block: np.ndarray) -> np.ndarray:
        """The task side of the crosses, (..., len(cross_task)); counts on a log2(1 + x) scale."""
        t = task_block[..., self.cross_task_index].astype(np.float32, copy=False)
        logs = _log_positions(tuple(self.cross_log))
        if len(logs):
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

    # -- fitting and batch transform (the pandas side: scheduler/feature_frames.py)
    @classmethod
    def fit(
        cls, df: pd.DataFrame, config: PredictorConfig, encoder: TextEncoder | None = None
    ) -> FeatureSpace:
        """The layout of the columns ``df`` fills, its text projections, crosses and method table."""
        return fit_space(cls, df, config, encoder)

    def transform(
        self,
        df: pd.DataFrame,
        encoder: TextEncoder | None = None,
        *,
        text_dropout: float = 0.0,
        rng: np.random.Generator | None = None,
    ) -> np.ndarray:
        """(len(df), n_features) float32; missing values are NaN."""
        return transform_frame(self, df, encoder, text_dropout=text_dropout, rng=rng)

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
        feats = hardware_features(hw)
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
