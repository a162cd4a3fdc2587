"""Acceleration methods through the DHT-routed chain driver (node.blocks.chain_engine.ChainEngine).

The engine routes over block records (here a fixed list instead of a live DHT, so the test is
about methods, not discovery), probes the peers, and hands every non-baseline request to
node.accel: the output stays token-identical to transformers greedy generate, over accelerated
servers and over the plain block servers alike, and a dead hop is routed around.
"""

from __future__ import annotations

import asyncio

import pytest

from node.blocks.chain_engine import ChainConfig, ChainEngine
from node.engine import GenerationRequest
from proto.records import BlockRecord
from tests.helpers_accel import MODEL_NAME, accel_chain, plain_servers, reference_greedy

PROMPTS = [(5, 77, 300, 12, 99, 100, 7, 8) * 3, tuple(range(40, 80))]
NEW_TOKENS = 16


class FixedRecords:
    """A RecordSource over a fixed list of block servers."""

    def __init__(self, records: list[BlockRecord]) -> None:
        self.records = records

    async def block_records(self, model: str, num_blocks: int) -> list[BlockRecord]:
        return list(self.records)


def records_for(addresses_and_spans: list[tuple[str, int, int]]) -> list[BlockRecord]:
    return [
        BlockRecord(peer_id=f"peer{i}", address=a, group="g", start_block=s, end_block=e, throughput_tok_s=100.0)
        for i, (a, s, e) in enumerate(addresses_and_spans)
    ]


async def generate(engine: ChainEngine, prompt, method: str) -> list[int]:
    request = GenerationRequest(prompt_ids=tuple(prompt), max_new_tokens=NEW_TOKENS, method=method)
    return [t async for t in engine.generate(request)]


@pytest.fixture(scope="module")
def expected(tiny_model_path):
    return reference_greedy(tiny_model_path, PROMPTS, NEW_TOKENS)


async def test_every_method_through_the_chain_engine_matches_greedy(tiny_model_path, expected):
    async with accel_chain(tiny_model_path, prefix_block_tokens=32) as chain:  # the driver's default granularity
        spans = [(s.address, s.config.start, s.config.end) for s in chain.servers]
        engine = ChainEngine(model_path=str(tiny_model_path), model_name=MODEL_NAME,
                             records=FixedRecords(records_for(spans)))
        try:
            for method in ("baseline", "continuous_batching", "prefix_caching", "chunked_prefill", "spec_ngram",
                           "all"):
                outs = await asyncio.gather(*(generate(engine, p, method) for p in PROMPTS))
                assert outs == expected, method
            # continuous batching went in batched messages; with two sessions over two hops the driver
            # pipelines them (one group per hop), so forwards hold one session each here
            assert all(s.servicer.batch_messages > 0 for s in chain.servers)
            assert all(s.servicer.prefix_cache.stats.hits > 0 for s in chain.servers)
        finally:
            await engine.close()


async def test_speculative_and_chunked_methods_work_over_plain_block_servers(tiny_model_path, expected):
    async with plain_servers(tiny_model_path, [(0, 2), (2, 4)]) as spans:
        engine = ChainEngine(model_path=str(tiny_model_path), model_name=MODEL_NAME,
                             records=FixedRecords(records_for(spans)))
        try:
            for method in ("spec_ngram", "chunked_prefill"):
                assert [await generate(engine, p, method) for p in PROMPTS] == expected, method
        finally:
            await engine.close()


async def test_a_dead_hop_is_routed_around_with_identical_output(tiny_model_path, expected, caplog):
    async with accel_chain(tiny_model_path, splits=((0, 2), (2, 4), (2, 4))) as chain:
        replica_a = chain.servers[1]
        records = records_for([(s.address, s.config.start, s.config.end) for s in chain.servers])
        records[1] = BlockRecord(peer_id="peer1", address=replica_a.address, group="g", start_block=2, end_block=4,
                                 throughput_tok_s=10_000.0)  # the route prefers this replica
        engine = ChainEngine(model_path=str(tiny_model_path), model_name=MODEL_NAME, records=FixedRecords(records),
                             config=ChainConfig(step_timeout_s=5.0))
        try:
            assert await generate(engine, PROMPTS[1], "spec_ngram") == expected[1]
            assert replica_a.servicer.batcher.stats.steps > 0
            await replica_a.close(grace=0)  # the preferred replica of 2:4 disappears
            with caplog.at_level("WARNING", logger="node.accel.chain"):
                assert await generate(engine, PROMPTS[1], "spec_ngram") == expected[1]
            assert "moving the session" in caplog.text or "opening on another route" in caplog.text
            assert chain.servers[2].servicer.batcher.stats.steps > 0  # the other replica took over
        finally:
            await engine.close()
