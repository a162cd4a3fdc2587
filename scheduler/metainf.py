"""Factory for `dinet-broker run --scheduler metainf [--scheduler-model PATH]` (see broker/policies.py).

:func:`build_policy` returns an :class:`~scheduler.online.OnlineLearner`: a
scheduling policy that is also fed the telemetry stream (it has ``observe``),
starts from the expert rules (or from a trained model) and retrains itself.

``PATH`` may be
- a model directory written by ``dinet-scheduler train`` (has ``meta.json``): the
  starting model; the learner's state goes to ``$DINET_SCHEDULER_STATE_DIR``, or a
  fresh temporary directory (the telemetry stream is replayed from its start at
  every broker start, so the meta-training set is rebuilt anyway);
- any other directory (existing or not): the learner's state directory;
- empty: state as above, cold start with expert rules.

Environment: ``DINET_SCHEDULER_STATE_DIR``, ``DINET_SCHEDULER_RETRAIN_EVERY`` (rows,
default 200), ``DINET_SCHEDULER_RETRAIN_INTERVAL_S`` (default 600),
``DINET_SCHEDULER_EPSILON`` (exploration rate, default 0.05),
``DINET_SCHEDULER_TEXT`` (0 disables the LM text embeddings; default 1).
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import replace
from pathlib import Path

from scheduler.online import OnlineLearner
from scheduler.predictor import META_FILE, PredictorConfig
from scheduler.selection import ExpertRulesPolicy, MetaInfPolicy, SelectionConfig

__all__ = ["ExpertRulesPolicy", "MetaInfPolicy", "OnlineLearner", "build_policy"]

logger = logging.getLogger(__name__)


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "")
    try:
        return float(raw) if raw else default
    except ValueError:
        raise ValueError(f"{name} must be a number, got {raw!r}") from None


def build_policy(model_path: str | None = None) -> OnlineLearner:
    """An online-learning MetaInf policy (see the module docstring for ``model_path``)."""
    initial = None
    state = os.environ.get("DINET_SCHEDULER_STATE_DIR", "")
    if model_path:
        p = Path(model_path)
        if (p / META_FILE).exists():
            initial = p
        else:
            state = str(p)
    if not state:
        state = tempfile.mkdtemp(prefix="dinet-scheduler-")
    config = replace(PredictorConfig(), use_text=os.environ.get("DINET_SCHEDULER_TEXT", "1") not in ("0", "false"))
    selection = replace(SelectionConfig(), epsilon=_env_float("DINET_SCHEDULER_EPSILON", SelectionConfig.epsilon))
    learner = OnlineLearner.create(
        state,
        retrain_every=int(_env_float("DINET_SCHEDULER_RETRAIN_EVERY", 200)),
        retrain_interval_s=_env_float("DINET_SCHEDULER_RETRAIN_INTERVAL_S", 600.0),
        initial_model=initial,
        config=config,
        selection=selection,
    )
    logger.info("MetaInf scheduler: state in %s, starting with %s %s", state, learner.name, learner.model_version)
    return learner
