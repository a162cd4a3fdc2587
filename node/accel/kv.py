"""Per-sequence KV cache over a node's block range, with O(1) amortised appends and free rollback.

Continuous batching runs sequences of different lengths in one forward. Instead of padding every
session's cache into one rectangular tensor each step (which copies the whole cache every token),
each sequence keeps its own preallocated buffers per layer; attention reads a view of the first
``length`` positions. Rolling back rejected speculative tokens is just lowering ``length``.
"""

from __future__ import annotations

import torch


class SequenceKV:
    """Keys and values of one sequence for ``num_layers`` consecutive blocks."""

    def __init__(
        self,
        *,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        capacity: int = 64,
    ) -> None:
        if num_layers <= 0 or num_kv_heads <= 0 or head_dim <= 0 or capacity <= 0:
            raise ValueError("num_layers, num_kv_heads, head_dim and capacity must be positive")
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.length = 0  # positions whose keys/values are valid in every layer
        self._keys = [torch.empty(num_kv_heads, capacity, head_dim, dtype=dtype) for _ in range(num_layers)]
        self._values = [torch.empty(num_kv_heads, capacity, head_dim, dtype=dtype) for _ in range(num_layers)]

    @property
    def capacity(self) -> int:
        return self._keys[0].shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes held by the buffers (capacity, not only the valid length)."""
        return 2 * self.num_layers * self._keys[0].numel() * self._keys[0].element_size()

    def bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self._keys[0].element_size()

    def _ensure(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        new_cap = max(needed, 2 * self.capacity)
        for store in (self._keys, self._values):
            for i, old in enumerate(store):
                grown = torch.empty(self.num_kv_heads, new_cap, self.head_dim, dtype=self.dtype)
                grown[:, : self.length] = old[:, : self.length]
                store[i] = grown

    def append(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``keys``/``values`` [kv_heads, n, head_dim] after the valid positions of ``layer``.

        Returns views [kv_heads, length + n, head_dim] covering the past and the new positions.
        ``length`` itself moves only in :meth:`advance`, once every layer has been written.
        """
        n = keys.shape[1]
        self._ensure(self.length + n)
        end = self.length + n
        self._keys[layer][:, self.length : end] = keys
        self._values[layer][:, self.length : end] = values
        return self._keys[layer][:, :end], self._values[layer][:, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def truncate(self, length: int) -> None:
        """Forget positions from ``length`` on (speculative rollback)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of length {self.length} to {length}")
        self.length = length

    def export_range(self, start: int, end: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Copies of positions [start, end) of every layer: [(keys, values)] each [kv_heads, end - start, head_dim]."""
        if not 0 <= start <= end <= self.length:
            raise ValueError(f"range [{start}, {end}) outside the valid cache [0, {self.length})")
        pairs = zip(self._keys, self._values, strict=True)
        return [(k[:, start:end].clone(), v[:, start:end].clone()) for k, v in pairs]

    def extend_from(self, chunks: list[list[tuple[torch.Tensor, torch.Tensor]]]) -> None:
        """Append precomputed positions (prefix-cache blocks, each a per-layer list of (keys, values))."""
        for chunk in chunks:
            if len(chunk) != self.num_layers:
                raise ValueError(f"chunk has {len(chunk)} layers, this cache has {self.num_layers}")
            n = chunk[0][0].shape[1]
            for layer, (k, v) in enumerate(chunk):
                self.append(layer, k.to(self.dtype), v.to(self.dtype))
            self.advance(n)
