"""The per-session options a driver sends in an ``Inference`` stream's invocation metadata.

Same wire contract as the plain block server (``proto/blocks.proto``), plus per-session options
carried in the stream's invocation metadata, so no message changes:

- ``dinet-method``: the request's method name (``proto.methods``); methods without batching run
  their steps alone (the baseline), batching methods share forwards with other sessions
  (:class:`~node.accel.batcher.StepBatcher`), dynamic batching waits ``batch_window_ms`` first.
- ``dinet-prefix-block`` and ``dinet-prefix-hashes``: the block size and chained hashes of the
  prompt's full blocks (:func:`~node.accel.prefix_cache.prefix_block_hashes`). The server answers
  in its initial metadata ``dinet-prefix-hit`` = leading tokens it holds (pinned for the session);
  the first step may then start at any ``position`` up to that, and the server fills the session's
  cache from the prefix cache. Blocks the session computes are added to the cache as they finish.

Kept apart from the server because both ends speak it: the servicer parses it
(:class:`SessionOptions`), the driver (:mod:`node.accel.chain_opener`) writes the keys and reads
the prefix hit, and a driver should not import the server to know a header name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from proto.methods import METHODS

MD_METHOD = "dinet-method"
MD_PREFIX_BLOCK = "dinet-prefix-block"
MD_PREFIX_HASHES = "dinet-prefix-hashes"
MD_PREFIX_HIT = "dinet-prefix-hit"
_HASH_RE = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True)
class SessionOptions:
    """What a client asked for in the stream metadata."""

    solo: bool
    window_ms: float
    prefix_hashes: tuple[str, ...]

    @classmethod
    def parse(cls, metadata: dict[str, str], prefix_block_tokens: int) -> SessionOptions:
        """:raises ValueError: for an unknown method or malformed prefix hashes."""
        name = metadata.get(MD_METHOD, "baseline")
        if name not in METHODS:
            raise ValueError(f"unknown method {name!r} in {MD_METHOD}")
        method = METHODS[name]
        batching = method.continuous_batching or method.dynamic_batching
        window = method.batch_window_ms if method.dynamic_batching else 0.0
        hashes: tuple[str, ...] = ()
        raw = metadata.get(MD_PREFIX_HASHES, "")
        if raw:
            if metadata.get(MD_PREFIX_BLOCK, "") != str(prefix_block_tokens):
                raw = ""  # a different granularity cannot match; run without the prefix cache
            hashes = tuple(h for h in raw.split(",") if h)
            if len(hashes) > 4096 or not all(_HASH_RE.match(h) for h in hashes):
                raise ValueError(f"{MD_PREFIX_HASHES} must be at most 4096 comma-separated 32-hex-digit hashes")
        return cls(solo=not batching, window_ms=window, prefix_hashes=hashes)
