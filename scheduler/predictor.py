"""The meta-predictor f(psi, phi, theta) -> log performance and its model files.

- :class:`~scheduler.features.FeatureSpace` (features.py) turns dataset rows (training, evaluation) or a live
  request/method/hardware triple (selection) into one float32 vector laid out as
  ``[task block | method block | hardware block]``, so a selection can build the
  matrix of all (method, group) pairs by concatenating precomputed blocks.
- :class:`MetaPredictor` holds a bootstrap ensemble of XGBoost regressors on
  ``log(performance)`` (mean = prediction, spread = uncertainty) and, when the
  data has ``runtime_s``, one regressor on ``log(runtime_s)`` for the cost model.
- :class:`~scheduler.forest.CompiledForest` (forest.py) evaluates all those trees at once with numpy
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from scheduler.config import PredictorConfig
from scheduler.embeddings import TextEncoder
from scheduler.features import FeatureSpace
from scheduler.forest import CompiledForest

__all__ = ["CompiledForest", "FeatureSpace", "MetaPredictor", "ModelFileError", "Prediction", "PredictorConfig"]

FORMAT = "dinet-metainf"
FORMAT_VERSION = 1
META_FILE = "meta.json"
FOREST_FILE = "forest.npz"  # the compiled trees (a cache: rebuilt from the members when missing)


class ModelFileError(ValueError):
    """A model directory is missing, incomplete or of an unknown format."""


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
        level_model: Any | None = None,
    ) -> None:
        """``level_model`` (relative targets): predicts a cell's mean log performance, which the members'
        predictions (log performance relative to that mean) are added to."""
        if not members:
            raise ValueError("a MetaPredictor needs at least one ensemble member")
        self.space = space
        self.members = members
        self.runtime_model = runtime_model
        self.level_model = level_model
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
            self._forest = CompiledForest(self.boosters, len(self._names))
        return self._forest

    @property
    def boosters(self) -> list[Any]:
        """Every booster, in the column order of the forest's sums: members, [runtime], [level]."""
        extra = [b for b in (self.runtime_model, self.level_model) if b is not None]
        return [*self.members, *extra]

    def split(self, sums: np.ndarray) -> Prediction:
        """Sums (..., members [+ runtime] [+ level]) -> mean, spread and runtime of the prediction."""
        k = len(self.members)
        perf = sums[..., :k]
        mean = perf.mean(-1)
        if self.level_model is not None:
            mean = mean + sums[..., -1]
        return Prediction(
            mean_log=mean,
            std_log=perf.std(-1) if k > 1 else np.zeros(perf.shape[:-1]),
            runtime_log=sums[..., k] if self.runtime_model is not None else None,
        )

    def predict_matrix(self, x: np.ndarray) -> Prediction:
        """Fast path (compiled numpy forest) for feature matrices built by :class:`FeatureSpace`."""
        return self.split(self.forest.member_sums(x))

    def predict_matrix_xgb(self, x: np.ndarray) -> Prediction:
        """The same through XGBoost itself (reference; used by tests and batch evaluation)."""
        cols = [m.inplace_predict(x) for m in self.boosters]
        return self.split(np.stack(cols, 1).astype(np.float64))

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
            level_file = None
            if self.level_model is not None:
                level_file = "level.ubj"
                self.level_model.save_model(str(tmp / level_file))
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
                "level_model": level_file,
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
        level = None
        if meta.get("level_model"):
            level = xgb.Booster()
            try:
                level.load_model(str(d / meta["level_model"]))
            except Exception as exc:
                raise ModelFileError(f"{d / meta['level_model']}: cannot load the level model ({exc})") from exc
        space = FeatureSpace.from_dict(meta["space"])
        if space.names != meta["features"]:
            raise ModelFileError(f"{d}: feature layout in {META_FILE} is inconsistent")
        predictor = cls(
            space, members, runtime, PredictorConfig.from_dict(meta.get("config", {})),
            version=str(meta["version"]), info=meta.get("info", {}), level_model=level,
        )
        for booster in predictor.boosters:
            booster.set_param({"nthread": 1})
        if meta.get("importances"):
            predictor._importances = {str(k): float(v) for k, v in meta["importances"].items()}
        forest_path = d / FOREST_FILE
        if forest_path.exists():
            try:
                with np.load(forest_path) as arrays:
                    forest = CompiledForest.from_arrays(dict(arrays))
                expected = len(predictor.boosters)
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
