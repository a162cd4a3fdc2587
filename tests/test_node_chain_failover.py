"""A full node mid-route: the driver moves the span to another replica and the output is unchanged.

In-process gRPC servers on loopback and a fixed list of records (the DHT is exercised by
test_node_chain_swarm.py); what is tested here is the driver's reaction to
RESOURCE_EXHAUSTED from the peer routing prefers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from node.blocks.block_functions import BlockSpan
from node.blocks.chain_engine import ChainEngine
from node.blocks.kv_cache import CacheManager
from node.blocks.loader import load_blocks, load_config
from node.blocks.server import BlockServicer, ServerLimits, start_grpc_server
from node.engine import GenerationRequest
from proto.errors import NoRouteError
from proto.records import BlockRecord
from tests.helpers_node import FixedRecords as Records
from tests.helpers_node import reference_generate

PROMPT = (5, 17, 200, 33, 99, 12, 7, 8)


@pytest.fixture
async def replicas(tiny_model_path: Path) -> AsyncIterator[list[BlockRecord]]:
    """Two servers of all 4 blocks: "full" (no cache room at all, announced as much faster) and "roomy"."""
    config = load_config(tiny_model_path)
    started, records = [], []
    for name, budget, tok_s in (("full", 0, 10_000.0), ("roomy", 1 << 24, 10.0)):
        span = BlockSpan.create(config, load_blocks(tiny_model_path, config, 0, 4), 0)
        servicer = BlockServicer(span=span, model_name="tiny", caches=CacheManager(budget_bytes=budget, ttl_s=60),
                                 limits=ServerLimits())
        server, port = await start_grpc_server(servicer, "127.0.0.1", 0)
        started.append((server, servicer))
        records.append(BlockRecord(peer_id=name, address=f"127.0.0.1:{port}", group="g", start_block=0,
                                   end_block=4, throughput_tok_s=tok_s))
    yield records
    for server, servicer in started:
        await server.stop(grace=None)
        servicer.close()


async def test_resource_exhausted_peer_is_replaced_and_tokens_stay_identical(
    tiny_model_path: Path, replicas: list[BlockRecord]
) -> None:
    engine = ChainEngine(model_path=str(tiny_model_path), model_name="tiny", records=Records(replicas))
    try:
        assert [h.peer_id for h in await engine.route(0, 4)] == ["full"]  # routing prefers the fast one
        tokens = [t async for t in engine.generate(GenerationRequest(prompt_ids=PROMPT, max_new_tokens=12))]
        assert tokens == reference_generate(tiny_model_path, list(PROMPT), 12)
        assert [h.peer_id for h in await engine.route(0, 4)] == ["roomy"]  # "full" answered and was banned
        # "roomy" gone: "full" was only full, not dead, so it is the last resort rather than no route at all
        engine.records = Records(replicas[:1])
        assert [h.peer_id for h in await engine.route(0, 4, refresh=True)] == ["full"]
        engine.records = Records([])
        with pytest.raises(NoRouteError) as info:
            await engine.route(0, 4, refresh=True)
        assert info.value.missing_blocks == [0, 1, 2, 3]
    finally:
        await engine.close()
