"""The online learner's state directory: the stored meta-training rows and the training job.

Layout (see :mod:`scheduler.online`): ``data/rows-NNNNNN.jsonl`` (append-only JSON
lines), ``models/<version>/`` (model directories), ``models/CURRENT`` (the model in
use), ``embeddings.npz`` (MiniLM vectors of texts already embedded).
:func:`train_main` is the entry point of the child process that retrains, :func:`train_in_child`
the parent's side of it (moved here from :class:`scheduler.online.OnlineLearner`).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from scheduler.config import PredictorConfig
from scheduler.dataset import rows_to_frame
from scheduler.training import TrainingCancelled, dataset_digest, make_version, train_predictor

logger = logging.getLogger(__name__)

DATA_DIR = "data"
MODELS_DIR = "models"
CURRENT = "CURRENT"
EMBED_CACHE = "embeddings.npz"  # MiniLM vectors of texts seen before, reused by every retrain


def json_value(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def read_rows(state_dir: str | Path) -> pd.DataFrame:
    """Every row stored under ``state_dir/data`` (oldest first) as a frame; empty when there are none."""
    rows = []
    for path in sorted((Path(state_dir) / DATA_DIR).glob("rows-*.jsonl")):
        with path.open() as fh:
            for line in fh:
                line = line.strip()
                if not line:
                    continue
                try:
                    rows.append(json.loads(line))
                except ValueError:  # a line cut by a crash mid-write
                    logger.warning("skipping an unreadable line in %s", path)
    return rows_to_frame(rows) if rows else pd.DataFrame()


def train_and_save(
    state_dir: Path, config: dict[str, Any], seq: int, max_rows: int, total_at_start: int,
    should_stop: Any = None,
) -> str:
    """Read the stored rows, train, save ``models/<version>``; returns the version."""
    from scheduler.embeddings import TextEncoder

    df = read_rows(state_dir)
    if len(df) > max_rows:
        df = df.tail(max_rows).reset_index(drop=True)
    cfg = PredictorConfig.from_dict(config)
    encoder = TextEncoder(cache_path=Path(state_dir) / EMBED_CACHE) if cfg.use_text else None
    version = make_version(seq, dataset_digest(df))
    predictor = train_predictor(df, cfg, version=version, encoder=encoder, should_stop=should_stop)
    predictor.info["rows_total_at_train"] = total_at_start
    predictor.save(Path(state_dir) / MODELS_DIR / version)
    if encoder is not None:
        encoder.save_cache()
    return version


def train_main(conn: Any, state_dir: str, config: dict[str, Any], seq: int, max_rows: int, total: int) -> None:
    """Entry point of the training child process: the result (or the error) goes back through ``conn``."""
    try:
        conn.send(("ok", train_and_save(Path(state_dir), config, seq, max_rows, total)))
    except Exception as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


def train_in_child(
    state_dir: Path, config: dict[str, Any], seq: int, max_rows: int, total_at_start: int,
    should_stop: Callable[[], bool], on_process: Callable[[Any], None] | None = None,
) -> str:
    """:func:`train_and_save` in a spawned child process (:func:`train_main`); returns the version.

    Why a child: pandas and XGBoost then never hold the GIL against the caller's event loop.
    ``should_stop`` is polled every 0.1 s; when it turns true the child is terminated.
    ``on_process`` is given the child once started and None once it is done (its owner shows it).

    :raises TrainingCancelled: when ``should_stop`` turned true.
    :raises RuntimeError: when training failed or the child exited without an answer.
    """
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    receiver, sender = ctx.Pipe(duplex=False)
    proc = ctx.Process(
        target=train_main,
        args=(sender, str(state_dir), config, seq, max_rows, total_at_start),
        daemon=True, name="dinet-scheduler-train",
    )
    proc.start()
    sender.close()
    if on_process is not None:
        on_process(proc)
    try:
        while True:
            if should_stop():
                proc.terminate()
                raise TrainingCancelled("training cancelled")
            if receiver.poll(0.1):
                status, payload = receiver.recv()
                break
            if not proc.is_alive() and not receiver.poll(0):
                status, payload = "error", f"the training process exited with code {proc.exitcode}"
                break
    finally:
        proc.join(10)
        receiver.close()
        if on_process is not None:
            on_process(None)
    if status != "ok":
        raise RuntimeError(payload)
    return str(payload)


def export_state(state_dir: str | Path, out: str | Path) -> tuple[Path, int]:
    """Write the meta-training set stored under ``state_dir`` to a .parquet or .csv file."""
    from scheduler.dataset import DatasetError, write_dataset

    state = Path(state_dir)
    if not (state / DATA_DIR).is_dir():
        raise DatasetError(f"{state} is not a scheduler state directory (no {DATA_DIR}/ inside)")
    df = read_rows(state)
    if df.empty:
        raise DatasetError(f"{state / DATA_DIR} holds no rows yet")
    return write_dataset(df, out), len(df)


def load_current(models_dir: Path) -> Any:
    """The model ``models/CURRENT`` points at (a MetaPredictor), or None (none yet, or unreadable)."""
    from scheduler.predictor import MetaPredictor

    pointer = models_dir / CURRENT
    if not pointer.exists():
        return None
    name = pointer.read_text().strip()
    try:
        return MetaPredictor.load(models_dir / name)
    except Exception as exc:
        logger.warning("cannot load the current model %s (%s); starting from expert rules", name, exc)
        return None


def next_seq(models_dir: Path) -> int:
    """The sequence number of the next ``v<seq>-<hash>`` model directory."""
    seqs = [0]
    for p in models_dir.glob("v*-*"):
        head = p.name[1:].split("-", 1)[0]
        if head.isdigit():
            seqs.append(int(head))
    return max(seqs) + 1


def prune_models(models_dir: Path, keep_models: int, *, keep: str) -> None:
    """Delete all but the newest ``keep_models`` model directories (never ``keep``)."""
    versions = sorted((p for p in models_dir.glob("v*-*") if p.is_dir()), key=lambda p: p.name)
    for p in versions[:-keep_models]:
        if p.name != keep:
            shutil.rmtree(p, ignore_errors=True)
