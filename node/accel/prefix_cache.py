"""Prefix cache: keys/values of shared prompt prefixes, reused across requests on every node of a chain.

Prompts are cut into blocks of ``block_tokens`` tokens; block i is keyed by a chained hash of all
tokens up to its end, so a key names a whole prefix, not just its last block (vLLM's automatic
prefix caching does the same). Intermediate nodes never see token ids: the driver computes the
hashes (:func:`prefix_block_hashes`) and sends them with the session; each node answers how many
leading blocks it holds, the driver starts the chain at the minimum over hops, and each node
copies those blocks into the session's cache.

Memory is bounded in bytes. Eviction is LRU over entries nobody is using: a lease pins the
entries a session is about to copy, and blocks of one prefix are touched last-to-first so the
tail of a prefix is evicted before its head (a head without its tail is still useful).
"""

from __future__ import annotations

import hashlib
import struct
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

BlockKV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values), each [kv_heads, block, head_dim]


def prefix_block_hashes(token_ids: Sequence[int], block_tokens: int, *, max_blocks: int | None = None) -> list[str]:
    """Chained hashes of every full block of ``token_ids``: entry i names tokens[: (i + 1) * block_tokens]."""
    if block_tokens <= 0:
        raise ValueError("block_tokens must be positive")
    n_blocks = len(token_ids) // block_tokens
    if max_blocks is not None:
        n_blocks = min(n_blocks, max_blocks)
    out: list[str] = []
    digest = b""
    for i in range(n_blocks):
        block = token_ids[i * block_tokens : (i + 1) * block_tokens]
        digest = hashlib.blake2b(digest + struct.pack(f"<{len(block)}q", *block), digest_size=16).digest()
        out.append(digest.hex())
    return out


@dataclass
class _Entry:
    kv: BlockKV
    nbytes: int
    refs: int = 0


@dataclass
class PrefixLease:
    """Pinned leading blocks of one session's prompt; release it once they are copied (or the session ends)."""

    keys: list[str]
    blocks: list[BlockKV]
    block_tokens: int
    released: bool = field(default=False)

    @property
    def tokens(self) -> int:
        return len(self.blocks) * self.block_tokens


@dataclass
class PrefixCacheStats:
    hits: int = 0  # blocks served from the cache
    misses: int = 0  # blocks asked for but absent
    inserts: int = 0
    evictions: int = 0
    rejected: int = 0  # inserts that did not fit even after evicting everything unpinned


class PrefixCache:
    """Bounded, reference-counted LRU cache of prefix blocks. Thread-safe (the executor runs in a thread)."""

    def __init__(self, *, block_tokens: int, max_bytes: int) -> None:
        if block_tokens <= 0 or max_bytes < 0:
            raise ValueError("block_tokens must be positive and max_bytes non-negative")
        self.block_tokens = block_tokens
        self.max_bytes = max_bytes
        self.bytes = 0
        self.stats = PrefixCacheStats()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def acquire(self, keys: Sequence[str]) -> PrefixLease:
        """Pin the longest run of leading blocks present; the lease may be empty."""
        with self._lock:
            found: list[str] = []
            for key in keys:
                if key not in self._entries:
                    break
                found.append(key)
            self.stats.hits += len(found)
            self.stats.misses += len(keys) - len(found)
            for key in reversed(found):  # head ends up most recently used
                self._entries[key].refs += 1
                self._entries.move_to_end(key)
            return PrefixLease(
                keys=found, blocks=[self._entries[k].kv for k in found], block_tokens=self.block_tokens
            )

    def release(self, lease: PrefixLease) -> None:
        with self._lock:
            if lease.released:
                return
            lease.released = True
            for key in lease.keys:
                entry = self._entries.get(key)
                if entry is not None:
                    entry.refs -= 1

    def insert(self, key: str, kv: BlockKV) -> bool:
        """Store one block (copies taken by the caller); evicts unpinned LRU entries to make room.

        Returns False when the block cannot fit (everything else pinned, or larger than the budget).
        """
        nbytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv)
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return True
            if nbytes > self.max_bytes:
                self.stats.rejected += 1
                return False
            if self.bytes + nbytes > self.max_bytes:
                for victim in [k for k, e in self._entries.items() if e.refs == 0]:
                    self.bytes -= self._entries.pop(victim).nbytes
                    self.stats.evictions += 1
                    if self.bytes + nbytes <= self.max_bytes:
                        break
            if self.bytes + nbytes > self.max_bytes:
                self.stats.rejected += 1
                return False
            self._entries[key] = _Entry(kv=kv, nbytes=nbytes)
            self.bytes += nbytes
            self.stats.inserts += 1
            return True
