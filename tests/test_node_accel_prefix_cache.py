"""Prefix cache: chained block hashes, bounded bytes, LRU eviction, and pinning of in-use entries."""

from __future__ import annotations

import pytest
import torch

from node.accel.prefix_cache import PrefixCache, prefix_block_hashes


def block(value: float, tokens: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One layer, 1 kv head, head_dim 2: 2 * tokens * 2 * 4 bytes = 16 * tokens bytes."""
    return [(torch.full((1, tokens, 2), value), torch.full((1, tokens, 2), value))]


BLOCK_BYTES = 64  # block() with 4 tokens


def test_hashes_name_whole_prefixes_and_only_full_blocks():
    a = prefix_block_hashes([1, 2, 3, 4, 5, 6, 7, 8, 9], 4)
    b = prefix_block_hashes([1, 2, 3, 4, 0, 6, 7, 8], 4)
    assert len(a) == 2 and len(b) == 2
    assert a[0] == b[0]  # same first block
    assert a[1] != b[1]  # different second block
    assert prefix_block_hashes([9, 9, 9, 9, 5, 6, 7, 8], 4)[1] != a[1]  # same last block, other head
    assert prefix_block_hashes([1, 2, 3], 4) == []
    assert prefix_block_hashes(list(range(40)), 4, max_blocks=3) == prefix_block_hashes(list(range(12)), 4)
    with pytest.raises(ValueError):
        prefix_block_hashes([1], 0)


def test_acquire_returns_the_longest_run_of_leading_blocks():
    cache = PrefixCache(block_tokens=4, max_bytes=10 * BLOCK_BYTES)
    keys = prefix_block_hashes(list(range(16)), 4)
    assert cache.insert(keys[0], block(0.0)) and cache.insert(keys[1], block(1.0)) and cache.insert(keys[3], block(3))
    lease = cache.acquire(keys)
    assert lease.tokens == 8  # block 2 is missing, so block 3 cannot be used
    assert [b[0][0][0, 0, 0].item() for b in lease.blocks] == [0.0, 1.0]
    cache.release(lease)
    cache.release(lease)  # idempotent
    assert cache.stats.hits == 2 and cache.stats.misses == 2


def test_memory_is_bounded_and_the_tail_of_a_prefix_is_evicted_before_its_head():
    cache = PrefixCache(block_tokens=4, max_bytes=3 * BLOCK_BYTES)
    keys = prefix_block_hashes(list(range(12)), 4)
    for i, key in enumerate(keys):
        assert cache.insert(key, block(float(i)))
    cache.release(cache.acquire(keys))  # touches the prefix: tail becomes least recently used
    other = prefix_block_hashes([99] * 4, 4)[0]
    assert cache.insert(other, block(9.0))
    assert cache.bytes <= 3 * BLOCK_BYTES
    assert keys[0] in cache and keys[1] in cache and keys[2] not in cache
    assert cache.stats.evictions == 1


def test_pinned_entries_are_never_evicted():
    cache = PrefixCache(block_tokens=4, max_bytes=2 * BLOCK_BYTES)
    keys = prefix_block_hashes(list(range(8)), 4)
    cache.insert(keys[0], block(0.0))
    cache.insert(keys[1], block(1.0))
    lease = cache.acquire(keys)
    newcomer = prefix_block_hashes([7] * 4, 4)[0]
    assert not cache.insert(newcomer, block(7.0))  # everything is pinned
    assert keys[0] in cache and keys[1] in cache and cache.stats.rejected == 1
    cache.release(lease)
    assert cache.insert(newcomer, block(7.0))
    assert not cache.insert("f" * 32, block(1.0, tokens=64))  # larger than the whole budget
