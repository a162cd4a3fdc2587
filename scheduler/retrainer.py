"""When and how the online learner retrains: the retrain thread, one training run, publishing its model.

:class:`Retrainer` decides that a retraining is due (``retrain_every`` new rows, or
``retrain_interval_s`` after the last training when rows arrived since, or an
explicit request), runs it on a daemon thread (never the event loop), has the fit
done by :mod:`scheduler.store` (in a child process by default), points
``models/CURRENT`` at the new model atomically and hands the predictor to its
owner's ``install``. It is apart from :class:`~scheduler.online.OnlineLearner`
(the policy, telemetry ingestion and status) because it owns the threading
state: the lock, the wake-up condition, the stop flag and the training counters.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from scheduler.interface import SchedulingPolicy
from scheduler.predictor import MetaPredictor, PredictorConfig
from scheduler.rowlog import RowLog
from scheduler.store import CURRENT, MODELS_DIR, next_seq, prune_models, train_and_save, train_in_child
from scheduler.training import TrainingCancelled

logger = logging.getLogger(__name__)


class Retrainer:
    """The retrain thread and the training runs of an online learner (see the module docstring)."""

    def __init__(
        self,
        state_dir: Path,
        rows: RowLog,
        *,
        install: Callable[[MetaPredictor], None],  # swaps the owner's policy to a freshly trained predictor
        current: Callable[[], SchedulingPolicy],  # the owner's policy now (named in failure logs)
        retrain_every: int,
        retrain_interval_s: float,
        min_rows: int,
        max_rows: int,
        keep_models: int,
        config: PredictorConfig,
        in_process: bool,
    ) -> None:
        self.state_dir = state_dir
        self._rows = rows
        self._install = install
        self._current = current
        self.retrain_every = retrain_every
        self.retrain_interval_s = retrain_interval_s
        self.min_rows = min_rows
        self.max_rows = max_rows
        self.keep_models = keep_models
        self.config = config
        self.in_process = in_process  # True: fit in the retrain thread instead of a child process
        self.proc: Any = None  # the running training process, if any

        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._train_lock = threading.Lock()  # one training at a time (thread or retrain_now)
        self._stop = threading.Event()
        self._requested = False
        self.training = False
        self.rows_since_train = 0
        self.trains = 0
        self.last_train_at = 0.0
        self.last_train_seconds = 0.0
        self.last_error = ""
        self._last_train_mono = time.monotonic()
        self.thread: threading.Thread | None = None

    def _models(self) -> Path:
        return self.state_dir / MODELS_DIR

    def resume(self, rows_since_train: int) -> None:
        """Count from the stored rows the model in use has not seen (all of them without a model); before start."""
        self.rows_since_train = rows_since_train
        if rows_since_train >= self.retrain_every and self._rows.total >= self.min_rows:
            self._requested = True

    def row_added(self) -> None:
        """Count one new stored row; wakes the thread when ``retrain_every`` rows have come."""
        with self._lock:
            self.rows_since_train += 1
            if self.rows_since_train >= self.retrain_every and self._rows.total >= self.min_rows:
                self._requested = True
                self._wake.notify()

    def retrain_now(self) -> str | None:
        """Train on the stored rows and install the result; returns the new version (blocks until done).

        The fit runs in a child process (``in_process=False``, the default) so that
        pandas and XGBoost never hold the GIL against the caller's event loop; the
        child saves the model directory and this process loads it (the compiled
        trees come precomputed in ``forest.npz``). Returns None (and sets
        ``last_error``) when there are too few rows, or training failed or was cancelled.
        """
        with self._train_lock:
            self._rows.flush()
            with self._lock:
                if self._rows.total < self.min_rows:
                    self.last_error = (
                        f"{self._rows.total} rows stored, {self.min_rows} needed before the first training"
                    )
                    return None
                self.training = True
                since_at_start = self.rows_since_train
                total_at_start = self._rows.total
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
                policy = self._current()
                logger.warning("retraining failed; keeping %s %s: %s", policy.name,
                               getattr(policy, "model_version", ""), exc)
                self.last_error = f"{type(exc).__name__}: {exc}"
                return None
            finally:
                with self._lock:
                    self.training = False
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
        """Keeps the running training child in ``proc`` (None when done), where tests and debuggers see it."""
        self.proc = proc

    def request(self) -> None:
        """Ask the thread to retrain now (returns at once)."""
        with self._lock:
            self._requested = True
            self._wake.notify()

    # ------------------------------------------------------------ the thread

    def start(self) -> None:
        if self.thread is None or not self.thread.is_alive():
            self._stop.clear()
            self.thread = threading.Thread(target=self._run, name="dinet-scheduler-retrain", daemon=True)
            self.thread.start()

    def _due(self) -> bool:
        if self._requested:
            return True
        if self.retrain_interval_s > 0 and self.rows_since_train > 0 and self._rows.total >= self.min_rows:
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

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the thread; a running training stops at the next ensemble member (or its child is terminated)."""
        self._stop.set()
        with self._wake:
            self._wake.notify_all()
        if self.thread is not None:
            self.thread.join(timeout)

    def wait_for_trains(self, count: int, timeout: float = 60.0) -> bool:
        """Block until ``trains >= count`` (tests, scripts); False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.trains >= count and not self.training:
                return True
            time.sleep(0.02)
        return self.trains >= count

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Block until no training runs or is due by row count (tests, scripts); False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                due = self._requested or (
                    self.rows_since_train >= self.retrain_every and self._rows.total >= self.min_rows
                )
                if not self.training and not due:
                    return True
            time.sleep(0.02)
        return False
