"""Two accelerated nodes found through a real hivemind DHT serve every method, token-identical to greedy."""

from __future__ import annotations

import asyncio

from node.accel.launch import start_accelerated_serving
from node.blocks.launch import ServingConfig
from node.engine import GenerationRequest
from proto.records import HardwareInfo
from tests.helpers_accel import reference_greedy

PROMPTS = [(5, 77, 300, 12, 99, 100, 7, 8) * 5, tuple(range(40, 90)), (11, 12, 13, 14) * 9]
NEW_TOKENS = 12


async def collect(engine, request: GenerationRequest) -> list[int]:
    return [t async for t in engine.generate(request)]


async def test_accelerated_nodes_in_the_dht_batch_and_reuse_prefixes(tiny_model_path):
    expected = reference_greedy(tiny_model_path, PROMPTS, NEW_TOKENS)
    first = await start_accelerated_serving(
        ServingConfig(model_path=str(tiny_model_path), model_name="tiny", group="g", start_block=0, end_block=2),
        HardwareInfo(),
    )
    second = None
    try:
        second = await start_accelerated_serving(
            ServingConfig(model_path=str(tiny_model_path), model_name="tiny", group="g", start_block=2, end_block=4,
                          initial_peers=tuple(first.dht_maddrs)),
            HardwareInfo(),
        )
        engine = second.engine  # the driver of any node routes through the swarm
        for method in ("continuous_batching", "all", "all"):
            requests = [GenerationRequest(prompt_ids=p, max_new_tokens=NEW_TOKENS, method=method) for p in PROMPTS]
            outs = await asyncio.gather(*(collect(engine, r) for r in requests))
            assert outs == expected, method
        servicers = [first._servicer, second._servicer]
        assert all(s.batcher.stats.max_batch > 1 for s in servicers)  # type: ignore[attr-defined]
        assert all(s.prefix_cache.stats.hits > 0 for s in servicers)  # type: ignore[attr-defined]
    finally:
        if second is not None:
            await second.close()
        await first.close()
