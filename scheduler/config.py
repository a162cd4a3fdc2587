"""Hyper-parameters of the meta-predictor (Algorithm 1), saved with every model."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


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
    # "absolute": members learn log(performance). "relative": members learn log(performance) minus the mean
    # over its (task, hardware) cell -- what ranking the methods of a cell needs -- and a level model learns
    # that cell mean (for costs and comparisons across groups); the prediction is their sum
    target: str = "absolute"
    level_rounds: int = 60
    cross_features: bool = True  # products of binary method flags with task meta-features (see FeatureSpace)
    # a text column is embedded only if it tells apart rows its numeric block does not (feature_frames._text_redundant)
    text_if_redundant: bool = False

    def __post_init__(self) -> None:
        if self.target not in ("absolute", "relative"):
            raise ValueError(f"target must be 'absolute' or 'relative', not {self.target!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PredictorConfig:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)
