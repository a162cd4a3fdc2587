"""Algorithm 1 (offline meta-training) of the MetaInf paper.

Input: the meta-training set D = {(task, method, hardware, performance)} in the
long-table format of :mod:`scheduler.dataset`.

1. For every row build the data embedding psi (``task.*`` meta-features + a PCA
   of the MiniLM embedding of ``task_text``), the method embedding phi
   (``method.*`` flags and parameters, filled from ``proto.methods`` for known
   names, + text) and the hardware embedding theta (``hw.*`` measured profile +
   a PCA of the embedding of ``hardware_text``); concatenate them.
2. Target y = log(performance): throughputs span orders of magnitude between a
   2-core CPU and a GPU, and ratios (not differences) decide which method wins.
3. Fit f(psi, phi, theta) -> y with XGBoost, as a bootstrap ensemble of
   ``config.ensemble`` members (each trained on a resample of the rows, as sample
   weights); the members' mean is the prediction and their spread the uncertainty
   that Algorithm 2 uses for bounded exploration.
4. When the set has ``runtime_s``, fit one more regressor on log(runtime_s) for
   the cost model (otherwise cost uses max_new_tokens / predicted tokens/s).
5. Report feature importances (total gain) and a versioned model.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from scheduler.dataset import validate_frame
from scheduler.embeddings import TextEncoder
from scheduler.predictor import FeatureSpace, MetaPredictor, PredictorConfig


class TrainingCancelled(Exception):
    """Raised inside a training run when its ``should_stop`` callback answers True."""


def dataset_digest(df: pd.DataFrame, salt: str = "") -> str:
    """A short content hash of the rows that matter (versions name the data they were trained on)."""
    key = df[["task", "method", "hardware", "performance"]]
    hashed = pd.util.hash_pandas_object(key, index=False).to_numpy()
    return hashlib.blake2b(hashed.tobytes() + salt.encode(), digest_size=4).hexdigest()


def make_version(seq: int | None, digest: str) -> str:
    """``v0007-1a2b3c4d`` (online learner: sequence + data hash) or ``m-1a2b3c4d`` (one-off training)."""
    return f"v{seq:04d}-{digest}" if seq is not None else f"m-{digest}"


def _params(config: PredictorConfig, *, depth: int, seed: int) -> dict[str, Any]:
    return {
        "objective": "reg:squarederror",
        "tree_method": "hist",
        "max_depth": depth,
        "eta": config.eta,
        "min_child_weight": config.min_child_weight,
        "lambda": config.reg_lambda,
        "nthread": config.nthread,
        "seed": seed,
        "verbosity": 0,
    }


def train_predictor(
    df: pd.DataFrame,
    config: PredictorConfig | None = None,
    *,
    version: str | None = None,
    encoder: TextEncoder | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> MetaPredictor:
    """Algorithm 1 on ``df`` (validated here). Training on a few thousand rows takes seconds.

    :raises scheduler.dataset.DatasetError: the frame is not a usable dataset.
    :raises TrainingCancelled: ``should_stop()`` answered True between ensemble members.
    """
    import xgboost as xgb

    config = config or PredictorConfig()
    started = time.monotonic()
    df = validate_frame(df)
    space = FeatureSpace.fit(df, config, encoder)
    rng = np.random.default_rng(config.seed)
    x = space.transform(df, encoder, text_dropout=config.text_dropout if space.uses_text else 0.0, rng=rng)
    y = np.log(df["performance"].to_numpy(dtype=np.float64))
    n = len(df)
    level_model = None
    if config.target == "relative":
        cells = df["task"].astype(str) + "\x1f" + df["hardware"].astype(str)
        cell_mean = pd.Series(y).groupby(cells.to_numpy()).transform("mean").to_numpy()
        dlevel = xgb.DMatrix(x, label=cell_mean, nthread=config.nthread)
        level_model = xgb.train(_params(config, depth=config.max_depth, seed=config.seed + 2000), dlevel,
                                config.level_rounds)
        y = y - cell_mean

    members = []
    for i in range(max(1, config.ensemble)):
        if should_stop is not None and should_stop():
            raise TrainingCancelled("training cancelled")
        weights = np.bincount(rng.integers(0, n, n), minlength=n).astype(np.float32) if config.ensemble > 1 else None
        dtrain = xgb.DMatrix(x, label=y, weight=weights, nthread=config.nthread)
        members.append(
            xgb.train(_params(config, depth=config.max_depth, seed=config.seed + i), dtrain, config.rounds)
        )

    runtime_model = None
    if "runtime_s" in df.columns:
        rt = df["runtime_s"].to_numpy(dtype=np.float64, na_value=np.nan)
        ok = np.isfinite(rt) & (rt > 0)
        if ok.sum() >= max(10, n // 2):
            if should_stop is not None and should_stop():
                raise TrainingCancelled("training cancelled")
            dtrain = xgb.DMatrix(x[ok], label=np.log(rt[ok]), nthread=config.nthread)
            runtime_model = xgb.train(
                _params(config, depth=config.runtime_max_depth, seed=config.seed + 1000), dtrain, config.runtime_rounds
            )

    for booster in [*members, *(b for b in (runtime_model, level_model) if b is not None)]:
        booster.set_param({"nthread": 1})  # prediction of a 32-row batch is fastest single-threaded

    digest = dataset_digest(df)
    if version is None:  # one-off training: the version names the data and the configuration
        version = make_version(None, dataset_digest(df, json.dumps(config.to_dict(), sort_keys=True)))
    predictor = MetaPredictor(space, members, runtime_model, config, version=version, level_model=level_model)
    fitted = predictor.predict_matrix_xgb(x)
    y = np.log(df["performance"].to_numpy(dtype=np.float64))
    predictor.info = {
        "rows": n,
        "dropped_rows": int(df.attrs.get("dropped_rows", 0)),
        "tasks": int(df["task"].nunique()),
        "methods": sorted(df["method"].unique().tolist()),
        "hardware": sorted(df["hardware"].unique().tolist()),
        "features": len(space.names),
        "uses_text": space.uses_text,
        "text_skipped_as_redundant": space.text_skipped,
        "serving_missing": space.serving_missing,
        "in_sample_log_rmse": float(np.sqrt(np.mean((fitted.mean_log - y) ** 2))),
        "runtime_model": runtime_model is not None,
        "data_digest": digest,
        "trained_at": time.time(),
        "train_seconds": round(time.monotonic() - started, 3),
    }
    return predictor
