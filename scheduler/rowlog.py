"""Telemetry ingestion: the meta-training set as append-only JSON-line chunks, deduplicated by request id.

Kept apart from the online learner (:mod:`scheduler.online`, retraining in :mod:`scheduler.retrainer`) because it is the
part every TimingReport goes through: it must be cheap (one row conversion and one
line written under a lock), idempotent (replaying the telemetry stream from its
start after a restart adds nothing: rows are keyed by ``request_id``) and durable
line by line (each row reaches the OS when written). Layout:
``state_dir/data/rows-NNNNNN.jsonl``, a new chunk every ``chunk_rows`` rows.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from proto import messages_pb2
from scheduler.dataset import timing_report_to_row
from scheduler.store import DATA_DIR, json_value


class RowLog:
    """The stored rows of one learner's state directory (thread-safe)."""

    def __init__(self, state_dir: str | Path, *, chunk_rows: int = 5_000) -> None:
        if chunk_rows < 1:
            raise ValueError("chunk_rows must be >= 1")
        self.dir = Path(state_dir) / DATA_DIR
        self.dir.mkdir(parents=True, exist_ok=True)
        self.chunk_rows = chunk_rows
        self.lock = threading.Lock()
        self._fh: IO[str] | None = None
        self._chunk_rows_written = 0
        self._seen: set[str] = set()
        self.total = 0  # rows stored, including those found on disk at start
        self.rejected = 0  # reports that were not rows (failed runs, duplicates)
        paths = sorted(self.dir.glob("rows-*.jsonl"))
        for path in paths:
            with path.open() as fh:
                for line in fh:
                    if not line.strip():
                        continue
                    self.total += 1
                    try:
                        rid = json.loads(line).get("request_id")
                    except ValueError:
                        continue
                    if rid:
                        self._seen.add(rid)
        self._next_chunk = len(paths) + 1

    def _open_chunk(self) -> IO[str]:
        if self._fh is None or self._chunk_rows_written >= self.chunk_rows:
            if self._fh is not None:
                self._fh.close()
            path = self.dir / f"rows-{self._next_chunk:06d}.jsonl"
            while path.exists():
                self._next_chunk += 1
                path = self.dir / f"rows-{self._next_chunk:06d}.jsonl"
            self._next_chunk += 1
            self._fh = path.open("a", buffering=1)  # line buffered: each row reaches the OS when written
            self._chunk_rows_written = 0
        return self._fh

    def append(self, report: messages_pb2.TimingReport | bytes | Mapping[str, Any]) -> bool:
        """Store one report (or an already converted row); False when it is not a new row."""
        row = dict(report) if isinstance(report, Mapping) else timing_report_to_row(report)
        if row is None:
            with self.lock:
                self.rejected += 1
            return False
        rid = row.get("request_id")
        line = json.dumps({k: json_value(v) for k, v in row.items()}, default=str)
        with self.lock:
            if rid:
                if rid in self._seen:
                    self.rejected += 1
                    return False
                self._seen.add(rid)
            self._open_chunk().write(line + "\n")
            self._chunk_rows_written += 1
            self.total += 1
        return True

    def flush(self) -> None:
        with self.lock:
            if self._fh is not None:
                self._fh.flush()

    def close(self) -> None:
        with self.lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None
