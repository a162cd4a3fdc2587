"""The feature vector of the meta-predictor: psi (task), phi (method), theta (hardware) and their crosses.

:class:`FeatureSpace` turns dataset rows (training, evaluation) or a live
request/method/hardware triple (selection) into one float32 vector laid out as
``[task block | method block | hardware block | method x task crosses]``, so a
selection can build the matrix of all (method, group) pairs from precomputed
blocks. See docs/scheduler.md, "Embeddings".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
import pandas as pd

from proto.methods import METHODS
from proto.records import HardwareInfo
from scheduler.config import PredictorConfig
from scheduler.embeddings import (
    TASK_FEATURES,
    TextEncoder,
    TextProjection,
    hardware_features,
    method_features,
    normalize_text,
)


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
