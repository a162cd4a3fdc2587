"""The pandas side of :class:`~scheduler.features.FeatureSpace`: fitting its layout to a frame, frames -> matrices.

Training and evaluation hand the feature space whole meta-training frames: which
columns exist, which text columns are worth embedding, which method flags to cross
with which task columns, and the column-wise fill of a ``(rows, n_features)``
matrix. Selection never sees a frame (it builds its rows from the request and
the directory's records with the serving-time vectors in scheduler/features.py),
so this code lives apart from the layout and the per-request path, and
:meth:`FeatureSpace.fit` / :meth:`FeatureSpace.transform` delegate here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from proto.methods import METHODS
from scheduler.config import PredictorConfig
from scheduler.embeddings import TASK_FEATURES, TextEncoder, TextProjection, method_features, normalize_text

if TYPE_CHECKING:
    from scheduler.features import FeatureSpace


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


def fit_space(
    cls: type[FeatureSpace], df: pd.DataFrame, config: PredictorConfig, encoder: TextEncoder | None = None
) -> FeatureSpace:
    """The body of :meth:`FeatureSpace.fit`: a layout that describes the columns ``df`` actually fills."""
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
    full = _method_block(space, df, encoder)
    for m in sorted(df["method"].unique()):
        rows = full[names == m]
        with np.errstate(all="ignore"):
            vec = np.nanmedian(rows, axis=0) if len(rows) else np.full(space.n_method, np.nan)
        space.method_table[m] = [float(v) for v in vec]
    return space


def _project(proj: TextProjection | None, texts: list[str], encoder: TextEncoder | None) -> np.ndarray:
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


def _method_block(space: FeatureSpace, df: pd.DataFrame, encoder: TextEncoder | None) -> np.ndarray:
    parts = [_fill_method_numeric(df, space.method_cols)]
    parts.append(_project(space.method_text, _text_col(df, "method_text"), encoder))
    if space.method_ids:
        names = df["method"].to_numpy()
        parts.append(np.stack([(names == m) for m in space.method_ids], 1).astype(np.float32))
    return np.concatenate(parts, 1) if parts else np.zeros((len(df), 0), np.float32)


def transform_frame(
    space: FeatureSpace,
    df: pd.DataFrame,
    encoder: TextEncoder | None = None,
    *,
    text_dropout: float = 0.0,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """The body of :meth:`FeatureSpace.transform`: (len(df), n_features) float32; missing values are NaN."""
    n = len(df)
    task_num = np.full((n, len(space.task_cols)), np.nan, np.float32)
    for j, col in enumerate(space.task_cols):
        if col in df.columns:
            task_num[:, j] = df[col].to_numpy(dtype=np.float32, na_value=np.nan)
    task_txt = _project(space.task_text, _text_col(df, "task_text"), encoder)
    hw_num = np.full((n, len(space.hw_cols)), np.nan, np.float32)
    for j, col in enumerate(space.hw_cols):
        if col in df.columns:
            hw_num[:, j] = df[col].to_numpy(dtype=np.float32, na_value=np.nan)
    hw_txt = _project(space.hw_text, _text_col(df, "hardware_text"), encoder)
    if text_dropout > 0:
        rng = rng or np.random.default_rng(0)
        for block in (task_txt, hw_txt):
            if block.shape[1]:
                block[rng.random(n) < text_dropout] = np.nan
    method_block = _method_block(space, df, encoder)
    parts = [task_num, task_txt, method_block, hw_num, hw_txt]
    if space.hw_ids:
        hws = df["hardware"].to_numpy()
        parts.append(np.stack([(hws == h) for h in space.hw_ids], 1).astype(np.float32))
    if space.n_cross:
        parts.append(space.crosses(method_block[:, space.flag_index], space.cross_task_values(task_num)))
    return np.concatenate(parts, 1).astype(np.float32)
