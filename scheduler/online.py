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
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from proto import messages_pb2
from scheduler.interface import GroupCandidate, RequestFeatures, SchedulingPolicy, Selection
from scheduler.predictor import MetaPredictor, PredictorConfig
from scheduler.rowlog import RowLog
from scheduler.selection import ExpertRulesPolicy, MetaInfPolicy, SelectionConfig
from scheduler.store import (
    CURRENT,
    MODELS_DIR,
    load_current,
    next_seq,
    prune_models,
    read_rows,
    train_and_save,
    train_in_child,
)
from scheduler.training import TrainingCancelled

logger = logging.getLogger(__name__)

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
        self.retrain_every = retrain_every
        self.retrain_interval_s = float(retrain_interval_s)
        self.min_rows = min_rows
        self.max_rows = max_rows
        self.chunk_rows = chunk_rows
        self.keep_models = max(1, keep_models)
        self.config = config or PredictorConfig()
        self.selection_config = selection or SelectionConfig()
        self._seed = seed
        self.in_process = in_process  # True: fit in the retrain thread instead of a child process
        self._proc: Any = None  # the running training process, if any
        (self.state_dir / MODELS_DIR).mkdir(parents=True, exist_ok=True)
        self._rows = RowLog(self.state_dir, chunk_rows=chunk_rows)  # telemetry ingestion

        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._train_lock = threading.Lock()  # one training at a time (thread or retrain_now)
        self._stop = threading.Event()
        self._requested = False
        self._training = False
        self.rows_since_train = 0
        self.trains = 0
        self.last_train_at = 0.0
        self.last_train_seconds = 0.0
        self.last_error = ""
        self._last_train_mono = time.monotonic()

        self._policy: SchedulingPolicy = ExpertRulesPolicy()
        predictor = load_current(self._models())
        if predictor is None and initial_model is not None:
            predictor = initial_model if isinstance(initial_model, MetaPredictor) else MetaPredictor.load(initial_model)
        if predictor is not None:
            self._install(predictor)
            trained_at_total = predictor.info.get("rows_total_at_train")
            if isinstance(trained_at_total, int):
                self.rows_since_train = max(0, self.rows_total - trained_at_total)
            else:
                self.rows_since_train = self.rows_total
        else:
            self.rows_since_train = self.rows_total
        self.name = self._policy.name
        if self.rows_since_train >= self.retrain_every and self.rows_total >= self.min_rows:
            self._requested = True
        self._thread: threading.Thread | None = None
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
        with self._lock:
            self.rows_since_train += 1
            if self.rows_since_train >= self.retrain_every and self.rows_total >= self.min_rows:
                self._requested = True
                self._wake.notify()
        return True

    def dataset(self) -> pd.DataFrame:
        """The stored meta-training set (newest ``max_rows`` rows)."""
        self._rows.flush()
        df = read_rows(self.state_dir)
        return df.tail(self.max_rows).reset_index(drop=True) if len(df) > self.max_rows else df

    # ------------------------------------------------------------ models

    def _models(self) -> Path:
        return self.state_dir / MODELS_DIR

    def retrain_now(self) -> str | None:
        """Train on the stored rows and swap the policy; returns the new version (blocks until done).

        The fit runs in a child process (``in_process=False``, the default) so that
        pandas and XGBoost never hold the GIL against the caller's event loop; the
        child saves the model directory and this process loads it (the compiled
        trees come precomputed in ``forest.npz``). Returns None (and sets
        ``last_error``) when there are too few rows, or training failed or was cancelled.
        """
        with self._train_lock:
            self._rows.flush()
            with self._lock:
                if self.rows_total < self.min_rows:
                    self.last_error = f"{self.rows_total} rows stored, {self.min_rows} needed before the first training"
                    return None
                self._training = True
                since_at_start = self.rows_since_train
                total_at_start = self.rows_total
            started = time.monotonic()
            seq = next_seq(self._models())
            try:
                if self.in_process:
                    version = train_and_save(self.state_dir, self.config.to_dict(), seq, self.max_rows,
                                              total_at_start, self._stop.is_set)
                else:
                    version = train_in_child(self.state_dir, self.config.to_dict(), seq, self.max_rows,
                                             total_at_start, self._stop.is_set, self._track_process)
                predictor = MetaPredictor.load(self._models() / version)
                tmp = self._models() / f".{CURRENT}.tmp"
                tmp.write_text(version + "\n")
                os.replace(tmp, self._models() / CURRENT)
                self._install(predictor)
                prune_models(self._models(), self.keep_models, keep=version)
            except TrainingCancelled:
                self.last_error = "training cancelled"
                return None
            except Exception as exc:
                logger.warning("retraining failed; keeping %s %s: %s", self._policy.name, self.model_version, exc)
                self.last_error = f"{type(exc).__name__}: {exc}"
                return None
            finally:
                with self._lock:
                    self._training = False
                    self._last_train_mono = time.monotonic()
            with self._lock:
                self.rows_since_train = max(0, self.rows_since_train - since_at_start)
            self.trains += 1
            self.last_error = ""
            self.last_train_at = time.time()
            self.last_train_seconds = round(time.monotonic() - started, 3)
            logger.info("scheduler model %s trained in %.2fs", version, self.last_train_seconds)
            return version

    def _track_process(self, proc: Any) -> None:
        """Keeps the running training child in ``_proc`` (None when done), where tests and debuggers see it."""
        self._proc = proc

    def request_retrain(self) -> None:
        """Ask the background thread to retrain now (returns at once)."""
        with self._lock:
            self._requested = True
            self._wake.notify()

    # ------------------------------------------------------------ background thread

    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="dinet-scheduler-retrain", daemon=True)
            self._thread.start()

    def _due(self) -> bool:
        if self._requested:
            return True
        if self.retrain_interval_s > 0 and self.rows_since_train > 0 and self.rows_total >= self.min_rows:
            return time.monotonic() - self._last_train_mono >= self.retrain_interval_s
        return False

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._wake:
                if not self._due():
                    timeout = None
                    if self.retrain_interval_s > 0:
                        timeout = max(0.05, self.retrain_interval_s - (time.monotonic() - self._last_train_mono))
                    self._wake.wait(timeout)
                if self._stop.is_set():
                    break
                if not self._due():
                    continue
                self._requested = False
            self.retrain_now()

    def close(self, timeout: float = 30.0) -> None:
        """Stop the retrain thread (a running training stops at the next ensemble member) and close files."""
        self._stop.set()
        with self._wake:
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        self._rows.close()

    def __enter__(self) -> OnlineLearner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait_for_trains(self, count: int, timeout: float = 60.0) -> bool:
        """Block until ``trains >= count`` (tests, scripts); False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.trains >= count and not self._training:
                return True
            time.sleep(0.02)
        return self.trains >= count

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Block until no training runs or is due by row count (tests, scripts); False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                due = self._requested or (
                    self.rows_since_train >= self.retrain_every and self.rows_total >= self.min_rows
                )
                if not self._training and not due:
                    return True
            time.sleep(0.02)
        return False

    # ------------------------------------------------------------ status

    def status(self) -> dict[str, Any]:
        """What `dinet-broker status` shows about the scheduler."""
        policy = self._policy
        out: dict[str, Any] = {
            "scheduler": policy.name,
            "model_version": getattr(policy, "model_version", ""),
            "rows": self.rows_total,
            "rows_since_train": self.rows_since_train,
            "rejected_reports": self.rejected,
            "retrain_every": self.retrain_every,
            "retrain_interval_s": self.retrain_interval_s,
            "min_rows": self.min_rows,
            "training": self._training,
            "trains": self.trains,
            "last_train_at": self.last_train_at,
            "last_train_seconds": self.last_train_seconds,
            "last_error": self.last_error,
            "state_dir": str(self.state_dir),
        }
        if isinstance(policy, MetaInfPolicy):
            out.update(policy.serving_stats())
            out["top_features"] = dict(list(policy.predictor.feature_importances().items())[:5])
        return out
