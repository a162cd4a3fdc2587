"""Text embeddings for the selection path: never blocking, never in the broker's process.

Encoding a text costs milliseconds, far above the 1 ms selection budget.
:class:`BackgroundTextCache` answers from an LRU cache and, on a miss, returns
``None`` (the text dims become NaN, which the predictor was trained to handle by
"text dropout") and queues the text for a background thread. That thread hands it
to :class:`ProcessTextEncoder`, whose model runs in a child process, so torch never
competes with the broker's event loop for the GIL.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from scheduler.embeddings import EMBED_DIM, TextEncoder, get_encoder, text_key, uncached_texts

logger = logging.getLogger(__name__)
_LOCK = threading.Lock()


def _encoder_main(conn: Any, threads: int) -> None:
    """Child process of :class:`ProcessTextEncoder`: encode batches until the pipe closes."""
    try:
        import torch

        torch.set_num_threads(max(1, threads))
    except ImportError:  # pragma: no cover
        pass
    encoder = TextEncoder()
    while True:
        try:
            texts = conn.recv()
        except (EOFError, OSError):
            return
        try:
            conn.send(("ok", encoder.encode(texts)))
        except Exception as exc:
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


class ProcessTextEncoder:
    """:class:`TextEncoder`'s interface with the model in a child process (spawned on first use).

    For the broker: torch never runs in its process, so encoding texts cannot hold
    the GIL against the event loop, and the child uses ``threads`` torch threads
    (``DINET_EMBED_THREADS``, default 1) so it leaves the cores to the broker.
    """

    def __init__(self, *, cache_size: int = 20000, threads: int | None = None) -> None:
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_size = cache_size
        self._threads = threads if threads is not None else int(os.environ.get("DINET_EMBED_THREADS", "1") or 1)
        self._lock = threading.Lock()
        self._conn: Any = None
        self._proc: Any = None
        self.encoded = 0

    def cached(self, text: str, key: str | None = None) -> np.ndarray | None:
        return self._cache.get(key or text_key(text))

    def _ensure(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            return
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        self._proc = ctx.Process(target=_encoder_main, args=(child, self._threads), daemon=True,
                                 name="dinet-text-encoder")
        self._proc.start()
        child.close()
        self._conn = parent

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        keys = [text_key(t) for t in texts]
        with self._lock:
            missing = uncached_texts(keys, texts, self._cache)
            if missing:
                self._ensure()
                try:
                    self._conn.send(list(missing.values()))
                    status, payload = self._conn.recv()
                except (EOFError, OSError) as exc:
                    self._proc = None
                    raise RuntimeError(f"the text encoder process died ({exc})") from exc
                if status != "ok":
                    raise RuntimeError(str(payload))
                self.encoded += len(missing)
                for key, vec in zip(missing, payload, strict=True):
                    self._cache[key] = np.asarray(vec, np.float32)
            out = np.stack([self._cache[k] for k in keys]) if keys else np.zeros((0, EMBED_DIM), np.float32)
            for key in keys:
                self._cache.move_to_end(key)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
            return out

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            if self._proc is not None:
                self._proc.join(5)
                if self._proc.is_alive():
                    self._proc.terminate()
                self._proc = None


AnyEncoder = TextEncoder | ProcessTextEncoder


class BackgroundTextCache:
    """Non-blocking text -> embedding lookups for the selection path.

    :meth:`lookup` returns a cached vector or ``None``; a miss queues the text for a
    daemon thread that encodes it with :class:`TextEncoder`. The queue is bounded:
    when it is full, misses are dropped (they will be queued again on the next
    request with the same text).
    """

    def __init__(
        self, encoder: AnyEncoder | None = None, *, max_pending: int = 256, max_duty: float | None = None
    ) -> None:
        self._encoder = encoder
        # Fraction of one core the encoder may keep busy. Under a stream of new prompts the queue never
        # empties, and an encoder running flat out takes a core from the broker and RabbitMQ (measured:
        # routed/s fell from ~2,100 to ~900 on 2 cores). Misses beyond this budget stay text-less.
        duty = max_duty if max_duty is not None else float(os.environ.get("DINET_EMBED_DUTY", "0.2") or 0.2)
        if not 0.0 < duty <= 1.0:
            raise ValueError(f"max_duty must be in (0, 1], got {duty}")
        self._duty = duty
        self._queue: queue.Queue[str] = queue.Queue(maxsize=max_pending)
        self._pending: set[str] = set()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.failed: str = ""  # why the encoder could not be used (then lookups stay misses)

    @property
    def encoder(self) -> AnyEncoder:
        if self._encoder is None:
            in_process = os.environ.get("DINET_EMBED_IN_PROCESS", "") in ("1", "true")
            self._encoder = get_encoder() if in_process else ProcessTextEncoder()
        return self._encoder

    def lookup(self, text: str) -> np.ndarray | None:
        if not text:
            return None
        key = text_key(text)
        vec = self.encoder.cached(text, key)
        if vec is not None or self.failed:
            return vec
        with self._lock:
            if key in self._pending:
                return None
            try:
                self._queue.put_nowait(text)
            except queue.Full:
                return None
            self._pending.add(key)
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="dinet-text-embed", daemon=True)
                self._thread.start()
        return None

    def warm(self, texts: Iterable[str]) -> None:
        """Encode ``texts`` now (blocking), e.g. hardware descriptions at start-up."""
        texts = [t for t in texts if t]
        if texts and not self.failed:
            try:
                self.encoder.encode(texts)
            except RuntimeError as exc:
                self.failed = str(exc)

    def drain(self, timeout: float = 30.0) -> bool:
        """Wait until the queued texts are encoded (tests, benchmarks)."""
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if not self._pending:
                    return True
            time.sleep(0.01)
        return False

    def _work(self) -> None:
        import time

        while True:
            texts = [self._queue.get()]
            while len(texts) < 16:  # encode what piled up in one batch: cheaper per text
                try:
                    texts.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            started = time.perf_counter()
            try:
                if not self.failed:
                    self.encoder.encode(texts)
            except Exception as exc:  # the model could not load: stop trying, keep serving without text
                self.failed = str(exc)
                logger.warning("text embedding disabled: %s", exc)
            finally:
                with self._lock:
                    for text in texts:
                        self._pending.discard(text_key(text))
            busy = time.perf_counter() - started
            if self._duty < 1.0:
                time.sleep(busy * (1.0 / self._duty - 1.0))


_BACKGROUND: BackgroundTextCache | None = None


def get_background_cache() -> BackgroundTextCache:
    """The process-wide serving cache; its encoder runs in a child process (``DINET_EMBED_IN_PROCESS=1``: here)."""
    global _BACKGROUND
    with _LOCK:
        if _BACKGROUND is None:
            _BACKGROUND = BackgroundTextCache()
        return _BACKGROUND
