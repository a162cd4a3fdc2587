"""Acceleration methods for dinet's block chain: batching, prefix caching, chunked prefill, speculative decoding.

The pieces are engine-agnostic and small: a ragged per-sequence KV cache (:mod:`.kv`), a block
executor that runs several sessions' steps in one forward (:mod:`.executor`), a server-side step
scheduler (:mod:`.batcher`), a prefix cache (:mod:`.prefix_cache`), speculative drafting and
verification (:mod:`.speculative`), weight formats (:mod:`.weights`), and a gRPC block server
(:mod:`.server`) plus a chain driver (:mod:`.chain`) that apply them across a multi-node chain.
"""
