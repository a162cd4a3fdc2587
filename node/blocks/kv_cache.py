"""Server-side KV caches of inference sessions, under a memory budget and an idle TTL.

A :class:`SessionCache` holds the keys and values of one session for the span of
layers it runs through, preallocated to the session's ``max_length`` so that the budget
is charged once, up front, and a step never allocates. It duck-types the one method
transformers' attention calls on a cache (``update(key, value, layer_idx)``), so the
stock decoder layers write straight into it.

The cache is batch-shaped (``[layers, batch, kv_heads, max_length, head_dim]``) and a
step may carry several tokens, so batched sessions, chunked prefill and speculative
verification (:meth:`SessionCache.truncate` rolls rejected tokens back) fit as they are.

:class:`CacheManager` admits sessions while their bytes fit the budget (else
:class:`CacheFullError`, which the server maps to RESOURCE_EXHAUSTED) and drops the
ones idle for longer than the TTL.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


class CacheFullError(RuntimeError):
    """Admitting the session would exceed the node's cache budget (or session limit)."""


@dataclass(frozen=True)
class CacheSpec:
    """Shape of one session's cache over a span of layers."""

    first_layer: int  # global index of the span's first layer
    num_layers: int
    batch: int
    kv_heads: int
    head_dim: int
    max_length: int  # tokens the session may hold
    dtype: torch.dtype = torch.float32

    @property
    def nbytes(self) -> int:
        item = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.batch * self.kv_heads * self.max_length * self.head_dim * item


class SessionCache:
    """Keys and values of one session; ``length`` tokens are committed."""

    def __init__(self, spec: CacheSpec, device: torch.device | str = "cpu") -> None:
        self.spec = spec
        shape = (spec.num_layers, spec.batch, spec.kv_heads, spec.max_length, spec.head_dim)
        self.keys = torch.zeros(shape, dtype=spec.dtype, device=device)
        self.values = torch.zeros(shape, dtype=spec.dtype, device=device)
        self.length = 0

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's keys/values ([B, kv_heads, T, D]) after the committed ones; return all of them.

        Called by each layer during a step; the step's tokens count only after :meth:`commit`.
        """
        i = layer_idx - self.spec.first_layer
        end = self.length + key_states.shape[2]
        if end > self.spec.max_length:
            raise ValueError(f"session cache overflow: {end} tokens > max_length {self.spec.max_length}")
        self.keys[i, :, :, self.length:end] = key_states
        self.values[i, :, :, self.length:end] = value_states
        return self.keys[i, :, :, :end], self.values[i, :, :, :end]

    def commit(self, num_tokens: int) -> None:
        self.length += num_tokens

    def truncate(self, length: int) -> None:
        """Forget every token from ``length`` on (rollback of a rejected speculative suffix, or a replay)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} tokens to {length}")
        self.length = length

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length


@dataclass
class _Entry:
    cache: SessionCache
    last_used: float


class CacheManager:
    """Admits session caches within ``budget_bytes`` and expires those idle past ``ttl_s``."""

    def __init__(
        self,
        *,
        budget_bytes: int,
        ttl_s: float,
        max_sessions: int = 1024,
        device: torch.device | str = "cpu",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.budget_bytes = budget_bytes
        self.ttl_s = ttl_s
        self.max_sessions = max_sessions
        self.device = device
        self._clock = clock
        self._entries: dict[str, _Entry] = {}

    @property
    def used_bytes(self) -> int:
        return sum(e.cache.spec.nbytes for e in self._entries.values())

    @property
    def free_bytes(self) -> int:
        return max(self.budget_bytes - self.used_bytes, 0)

    @property
    def active_sessions(self) -> int:
        return len(self._entries)

    def allocate(self, session_id: str, spec: CacheSpec) -> SessionCache:
        """:raises CacheFullError: when the budget or the session limit cannot take it (after expiring idle ones).
        :raises KeyError: when ``session_id`` is already open.
        """
        if session_id in self._entries:
            raise KeyError(f"session {session_id!r} is already open")
        self.expire()
        if len(self._entries) >= self.max_sessions:
            raise CacheFullError(f"node holds its maximum of {self.max_sessions} sessions; try another peer")
        if spec.nbytes > self.free_bytes:
            raise CacheFullError(
                f"session needs {spec.nbytes} cache bytes, node has {self.free_bytes} of {self.budget_bytes} free; "
                "try another peer or a shorter max_length"
            )
        cache = SessionCache(spec, self.device)
        self._entries[session_id] = _Entry(cache, self._clock())
        return cache

    def get(self, session_id: str) -> SessionCache | None:
        """The session's cache (refreshing its TTL), or ``None`` if it was freed or expired."""
        entry = self._entries.get(session_id)
        if entry is None:
            return None
        entry.last_used = self._clock()
        return entry.cache

    def free(self, session_id: str) -> None:
        self._entries.pop(session_id, None)

    def expire(self) -> list[str]:
        """Drop sessions idle for longer than the TTL; returns their ids."""
        deadline = self._clock() - self.ttl_s
        expired = [sid for sid, e in self._entries.items() if e.last_used < deadline]
        for sid in expired:
            del self._entries[sid]
            logger.info("session %s expired after %.0f s idle", sid, self.ttl_s)
        return expired
