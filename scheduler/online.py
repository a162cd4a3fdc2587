"""Online learning from telemetry: the meta-training set on disk, background retraining, atomic swaps.

Usage (what the broker does)::

    from scheduler.online import OnlineLearner

    learner = OnlineLearner.create(
        "/var/lib/dinet/scheduler",   # state dir: data chunks + versioned models
        retrain_every=200,            # retrain after this many new rows ...
        retrain_interval_s=600,       # ... or this often when there are new rows (0 = never by time)
        initial_model=None,           # a model dir from `dinet-scheduler train`, or None: expert rules
    )
    selection = learner.select(features, candidates)  # an OnlineLearner is a SchedulingPolicy
    learner.observe(timing_report)                     # every TimingReport of the telemetry stream
    learner.status()                                   # dict for `dinet-broker status`
    learner.close()                                    # stops the retrain thread (cancels a running fit)

``learner.policy`` is the policy currently in use: :class:`ExpertRulesPolicy`
(``"expert-rules"``) until the first model exists, then :class:`MetaInfPolicy`
(``"metainf"``) whose ``model_version`` every :class:`Selection` records.

State directory::

    data/rows-000001.jsonl ...   append-only JSON lines, one meta-training row each (rotated)
    embeddings.npz               MiniLM vectors of texts already embedded (retrains encode only new texts)
    models/v0001-1a2b3c4d/ ...   one directory per trained model (the newest ``keep_models`` are kept)
    models/CURRENT               name of the model in use (replaced atomically)

:meth:`observe` hands the report to :class:`~scheduler.rowlog.RowLog` (telemetry ingestion:
a row conversion and one line appended under a lock)
and deduplicates on ``request_id``, so replaying the telemetry stream from its
start after a restart does not duplicate rows. Retraining is driven by a daemon
thread, never the event loop, and the fit itself runs in a child process (no GIL
contention with the broker; ``close()`` terminates it): after ``retrain_every`` new rows, or
``retrain_interval_s`` after the last training when rows arrived since. It trains on
the newest ``max_rows`` rows (so old behaviour ages out), saves the model, then
swaps the policy with a single reference assignment: a selection in flight
finishes with the model it started with. A failed training keeps the old policy
and is reported in ``status()["last_error"]``.

This module holds the policy side (the swap, selection, ingestion, status); the
retrain thread and the training runs are :class:`~scheduler.retrainer.Retrainer`
in scheduler/retrainer.py (``learner.retrainer``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from proto import messages_pb2
from scheduler.interface import GroupCandidate, RequestFeatures, SchedulingPolicy, Selection
from scheduler.predictor import MetaPredictor, PredictorConfig
from scheduler.retrainer import Retrainer
from scheduler.rowlog import RowLog
from scheduler.selection import ExpertRulesPolicy, MetaInfPolicy, SelectionConfig
from scheduler.store import MODELS_DIR, load_current, read_rows


class OnlineLearner(SchedulingPolicy):
    """A :class:`SchedulingPolicy` that learns from telemetry (see the module docstring)."""

    def __init__(
        self,
        state_dir: str | Path,
        *,
        retrain_every: int = 200,
        retrain_interval_s: float = 600.0,
        initial_model: str | Path | MetaPredictor | None = None,
        min_rows: int = 50,
        max_rows: int = 50_000,
        chunk_rows: int = 5_000,
        keep_models: int = 5,
        config: PredictorConfig | None = None,
        selection: SelectionConfig | None = None,
        seed: int | None = None,
        in_process: bool = False,
        start: bool = True,
    ) -> None:
        if retrain_every < 1:
            raise ValueError("retrain_every must be >= 1")
        self.state_dir = Path(state_dir)
        self.chunk_rows = chunk_rows
        self.config = config or PredictorConfig()
        self.selection_config = selection or SelectionConfig()
        self._seed = seed
        (self.state_dir / MODELS_DIR).mkdir(parents=True, exist_ok=True)
        self._rows = RowLog(self.state_dir, chunk_rows=chunk_rows)  # telemetry ingestion
        self.retrainer = Retrainer(
            self.state_dir, self._rows, install=self._install, current=lambda: self._policy,
            retrain_every=retrain_every, retrain_interval_s=float(retrain_interval_s), min_rows=min_rows,
            max_rows=max_rows, keep_models=max(1, keep_models), config=self.config, in_process=in_process,
        )

        self._policy: SchedulingPolicy = ExpertRulesPolicy()
        predictor = load_current(self.state_dir / MODELS_DIR)
        if predictor is None and initial_model is not None:
            predictor = initial_model if isinstance(initial_model, MetaPredictor) else MetaPredictor.load(initial_model)
        if predictor is not None:
            self._install(predictor)
            trained_at_total = predictor.info.get("rows_total_at_train")
            if isinstance(trained_at_total, int):
                self.retrainer.resume(max(0, self.rows_total - trained_at_total))
            else:
                self.retrainer.resume(self.rows_total)
        else:
            self.retrainer.resume(self.rows_total)
        self.name = self._policy.name
        if start:
            self.start()

    @classmethod
    def create(
        cls,
        state_dir: str | Path,
        retrain_every: int = 200,
        retrain_interval_s: float = 600.0,
        initial_model: str | Path | MetaPredictor | None = None,
        **kwargs: Any,
    ) -> OnlineLearner:
        """The broker's constructor; see the module docstring. Extra keyword arguments as in ``__init__``."""
        return cls(
            state_dir, retrain_every=retrain_every, retrain_interval_s=retrain_interval_s,
            initial_model=initial_model, **kwargs,
        )

    # ------------------------------------------------------------ policy

    @property
    def policy(self) -> SchedulingPolicy:
        """The policy in use now (swapped atomically by retraining)."""
        return self._policy

    @property
    def model_version(self) -> str:
        return getattr(self._policy, "model_version", "")

    def select(self, request: RequestFeatures, candidates: Sequence[GroupCandidate]) -> Selection:
        return self._policy.select(request, candidates)

    batches = True  # the policy it delegates to may change; MetaInfPolicy batches

    def select_many(
        self, items: Sequence[tuple[RequestFeatures, Sequence[GroupCandidate]]]
    ) -> list[Selection | Exception]:
        return self._policy.select_many(items)

    def _install(self, predictor: MetaPredictor) -> None:
        policy = MetaInfPolicy(predictor, self.selection_config, seed=self._seed)  # compiles the trees here
        self._policy = policy  # the atomic swap
        self.name = policy.name

    # ------------------------------------------------------------ data

    @property
    def rows_total(self) -> int:
        """Rows in the meta-training set (stored on disk)."""
        return self._rows.total

    @property
    def rejected(self) -> int:
        """Reports that were not rows (failed runs, duplicates)."""
        return self._rows.rejected

    def observe(self, report: messages_pb2.TimingReport | bytes | Mapping[str, Any]) -> bool:
        """Append one telemetry report (or an already converted row) to the meta-training set.

        Returns False when it is not a row: a failed run, no throughput, or a request_id seen before.
        """
        if not self._rows.append(report):
            return False
        self.retrainer.row_added()
        return True

    def dataset(self) -> pd.DataFrame:
        """The stored meta-training set (newest ``max_rows`` rows)."""
        self._rows.flush()
        df = read_rows(self.state_dir)
        max_rows = self.retrainer.max_rows
        return df.tail(max_rows).reset_index(drop=True) if len(df) > max_rows else df

    # ------------------------------------------------------------ retraining (scheduler/retrainer.py)

    @property
    def rows_since_train(self) -> int:
        return self.retrainer.rows_since_train

    @property
    def trains(self) -> int:
        return self.retrainer.trains

    @property
    def last_error(self) -> str:
        return self.retrainer.last_error

    def retrain_now(self) -> str | None:
        """Train on the stored rows and swap the policy (see :meth:`Retrainer.retrain_now`); None on failure."""
        return self.retrainer.retrain_now()

    def request_retrain(self) -> None:
        """Ask the background thread to retrain now (returns at once)."""
        self.retrainer.request()

    def start(self) -> None:
        self.retrainer.start()

    def close(self, timeout: float = 30.0) -> None:
        """Stop the retrain thread (a running training stops at the next ensemble member) and close files."""
        self.retrainer.stop(timeout)
        self._rows.close()

    def __enter__(self) -> OnlineLearner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait_for_trains(self, count: int, timeout: float = 60.0) -> bool:
        """Block until ``trains >= count`` (tests, scripts); False on timeout."""
        return self.retrainer.wait_for_trains(count, timeout)

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Block until no training runs or is due by row count (tests, scripts); False on timeout."""
        return self.retrainer.wait_idle(timeout)

    # ------------------------------------------------------------ status

    def status(self) -> dict[str, Any]:
        """What `dinet-broker status` shows about the scheduler."""
        policy = self._policy
        r = self.retrainer
        out: dict[str, Any] = {
            "scheduler": policy.name,
            "model_version": getattr(policy, "model_version", ""),
            "rows": self.rows_total,
            "rows_since_train": r.rows_since_train,
            "rejected_reports": self.rejected,
            "retrain_every": r.retrain_every,
            "retrain_interval_s": r.retrain_interval_s,
            "min_rows": r.min_rows,
            "training": r.training,
            "trains": r.trains,
            "last_train_at": r.last_train_at,
            "last_train_seconds": r.last_train_seconds,
            "last_error": r.last_error,
            "state_dir": str(self.state_dir),
        }
        if isinstance(policy, MetaInfPolicy):
            out.update(policy.serving_stats())
            out["top_features"] = dict(list(policy.predictor.feature_importances().items())[:5])
        return out
