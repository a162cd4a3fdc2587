"""Which requests already have a published result, so a redelivered task is not computed again.

A task comes back when a node published the final result but died (or lost its
connection) before the ack reached RabbitMQ. Two sources tell a node it can skip it:

- :class:`CompletedLedger`: this node's own record, an append-only file under the
  node's state directory, written (and fsynced) after the result's publish is confirmed
  and before the ack. It survives a restart.
- the telemetry stream: every node publishes a ``TimingReport`` after each result, so
  replaying the stream's recent past (:func:`node.telemetry.TelemetryTail`) also tells a
  node about results that *other* nodes of its group published.

Both are bounded: entries older than ``retention_s`` or beyond ``max_entries`` are
forgotten (an agent's reply queue expires after a day, so older results matter to no one).
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from collections import OrderedDict
from pathlib import Path
from typing import IO

from node.node_id import NodeIdentityError

logger = logging.getLogger(__name__)

LEDGER_FILE = "completed.tsv"
LOCK_FILE = "node.lock"
DEFAULT_RETENTION_S = 2 * 24 * 3600.0
DEFAULT_MAX_ENTRIES = 200_000


class StateDirInUseError(NodeIdentityError):
    """Another running node holds this state directory."""


class RecentIds:
    """A bounded set of request ids, oldest forgotten first."""

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        self._ids: OrderedDict[str, float] = OrderedDict()
        self._max = max_entries

    def add(self, request_id: str, at: float | None = None) -> None:
        self._ids[request_id] = time.time() if at is None else at
        self._ids.move_to_end(request_id)
        while len(self._ids) > self._max:
            self._ids.popitem(last=False)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def items(self) -> list[tuple[str, float]]:
        return list(self._ids.items())


class CompletedLedger:
    """Persistent record of the request ids whose final result this node published.

    :param state_dir: the node's state directory; the ledger holds an exclusive lock on it,
        so two nodes cannot share one by mistake.
    :raises StateDirInUseError: when another process holds the directory.
    """

    def __init__(
        self,
        state_dir: str | Path,
        *,
        retention_s: float = DEFAULT_RETENTION_S,
        max_entries: int = DEFAULT_MAX_ENTRIES,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._lock: IO[str] | None = self._acquire_lock()
        self._retention_s = retention_s
        self._ids = RecentIds(max_entries)
        self._path = self.state_dir / LEDGER_FILE
        self._load_and_compact()
        self._file: IO[str] | None = open(self._path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def _acquire_lock(self) -> IO[str]:
        lock = open(self.state_dir / LOCK_FILE, "a+", encoding="utf-8")  # noqa: SIM115 (held until close())
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise StateDirInUseError(
                f"state directory {self.state_dir} is in use by another running node; "
                "give each node its own --state-dir"
            ) from None
        return lock

    def _load_and_compact(self) -> None:
        if not self._path.exists():
            return
        horizon = time.time() - self._retention_s
        lines = 0
        with open(self._path, encoding="utf-8") as f:
            for line in f:
                lines += 1
                request_id, _, at = line.rstrip("\n").partition("\t")
                try:
                    stamp = float(at)
                except ValueError:
                    continue  # a torn last line from a crash mid-write
                if request_id and stamp >= horizon:
                    self._ids.add(request_id, stamp)
        if lines > len(self._ids):  # rewrite without expired or torn entries, atomically
            tmp = self._path.with_suffix(".tmp")
            with open(tmp, "w", encoding="utf-8") as f:
                for request_id, stamp in self._ids.items():
                    f.write(f"{request_id}\t{stamp:.3f}\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._path)
        logger.info("dedup ledger %s: %d completed request ids remembered", self._path, len(self._ids))

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, request_id: str) -> None:
        """Record ``request_id`` durably (flushed and fsynced before returning)."""
        if self._file is None:
            raise RuntimeError("ledger is closed")
        now = time.time()
        self._ids.add(request_id, now)
        clean = request_id.replace("\t", " ").replace("\n", " ")
        self._file.write(f"{clean}\t{now:.3f}\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._lock is not None:
            fcntl.flock(self._lock.fileno(), fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None
