"""A driver that serves blocks itself runs them in-process, and stays exact and fault tolerant doing so.

The remote peers are real gRPC servers on loopback (a fixed list of records stands in for the
DHT, which test_node_chain_swarm.py exercises). The driver's own blocks are a
:class:`~node.blocks.local_span.LocalBlocks` over a real :class:`BlockServicer`'s compute path and
cache budget, as ``node.blocks.launch`` wires them for ``dinet-node run --blocks``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from node.blocks.block_functions import BlockSpan
from node.blocks.chain_engine import ChainConfig, ChainEngine
from node.blocks.kv_cache import CacheManager
from node.blocks.loader import load_blocks, load_config
from node.blocks.local_span import LocalBlocks, LocalSpan
from node.blocks.remote import HopFailure, RemoteSpan
from node.blocks.routing import Hop
from node.blocks.server import BlockServicer, ServerLimits, start_grpc_server
from node.engine import GenerationRequest
from proto.errors import InvalidRequestError
from proto.records import BlockRecord
from tests.helpers_node import FixedRecords, reference_generate

PROMPT = (5, 17, 200, 33, 99, 12, 7, 8)
NEW_TOKENS = 10


@dataclass
class OwnBlocks:
    """The driving node's blocks 0:2 of the 4-block tiny model, and the servicer whose budget they share."""

    local: LocalBlocks
    servicer: BlockServicer


def own_blocks(model_path: Path, *, budget: int = 1 << 24, throughput: float = 10_000.0) -> OwnBlocks:
    config = load_config(model_path)
    span = BlockSpan.create(config, load_blocks(model_path, config, 0, 2), 0)
    caches = CacheManager(budget_bytes=budget, ttl_s=60)
    servicer = BlockServicer(span=span, model_name="tiny", caches=caches, limits=ServerLimits())
    record = BlockRecord(peer_id="me", address="127.0.0.1:1", group="g", start_block=0, end_block=2,
                         throughput_tok_s=throughput)
    local = LocalBlocks(steps=servicer.steps, caches=caches, max_length=servicer.max_length, record=lambda: record)
    return OwnBlocks(local, servicer)


@pytest.fixture
async def peers(tiny_model_path: Path) -> AsyncIterator[list[BlockRecord]]:
    """Remote servers: "first" (blocks 0:2, slower than the driver's own) and "second" (blocks 2:4)."""
    config = load_config(tiny_model_path)
    started, records = [], []
    for name, start, end in (("first", 0, 2), ("second", 2, 4)):
        span = BlockSpan.create(config, load_blocks(tiny_model_path, config, start, end), start)
        servicer = BlockServicer(span=span, model_name="tiny", caches=CacheManager(budget_bytes=1 << 24, ttl_s=60),
                                 limits=ServerLimits())
        server, port = await start_grpc_server(servicer, "127.0.0.1", 0)
        started.append((server, servicer))
        records.append(BlockRecord(peer_id=name, address=f"127.0.0.1:{port}", group="g", start_block=start,
                                   end_block=end, throughput_tok_s=100.0))
    yield records
    for server, servicer in started:
        await server.stop(grace=None)
        servicer.close()


async def generate(engine: ChainEngine) -> list[int]:
    return [t async for t in engine.generate(GenerationRequest(prompt_ids=PROMPT, max_new_tokens=NEW_TOKENS))]


async def test_own_blocks_run_in_process_and_tokens_match_transformers(
    tiny_model_path: Path, peers: list[BlockRecord]
) -> None:
    own = own_blocks(tiny_model_path)
    engine = ChainEngine(model_path=str(tiny_model_path), model_name="tiny", records=FixedRecords(peers),
                         local=own.local)
    try:
        session = await engine.open_session(max_length=32)
        try:
            assert [s.hop.peer_id for s in session.spans] == ["me", "second"]
            assert isinstance(session.spans[0].remote, LocalSpan)
            assert isinstance(session.spans[1].remote, RemoteSpan)
            out = await session.step(engine.driver.embed_ids(torch.tensor([list(PROMPT)])))
            assert out.shape == (1, len(PROMPT), engine.model_config.hidden_size)
            assert own.local.caches.active_sessions == 1  # charged to the node's own budget, like a peer's
        finally:
            await session.close()
        assert own.local.caches.active_sessions == 0
        assert await generate(engine) == reference_generate(tiny_model_path, list(PROMPT), NEW_TOKENS)
        assert own.local.caches.active_sessions == 0
    finally:
        await engine.close()
        own.servicer.close()


async def test_a_full_node_routes_its_own_span_to_a_replica_with_identical_tokens(
    tiny_model_path: Path, peers: list[BlockRecord]
) -> None:
    own = own_blocks(tiny_model_path, budget=0)  # no room for any session
    engine = ChainEngine(model_path=str(tiny_model_path), model_name="tiny", records=FixedRecords(peers),
                         local=own.local)
    try:
        assert [h.peer_id for h in await engine.route(0, 4)] == ["me", "second"]
        assert await generate(engine) == reference_generate(tiny_model_path, list(PROMPT), NEW_TOKENS)
        assert [h.peer_id for h in await engine.route(0, 4)] == ["first", "second"]  # "me" was only full: banned
    finally:
        await engine.close()
        own.servicer.close()


async def test_push_mode_carries_the_step_past_the_in_process_span(
    tiny_model_path: Path, peers: list[BlockRecord]
) -> None:
    own = own_blocks(tiny_model_path)
    engine = ChainEngine(model_path=str(tiny_model_path), model_name="tiny", records=FixedRecords(peers),
                         local=own.local, config=ChainConfig(push=True))
    try:
        session = await engine.open_session(max_length=32)
        try:
            assert session.spans[0].pushes is False
            for length in (len(PROMPT), 1, 1):
                await session.step(torch.randn(1, length, engine.model_config.hidden_size))
            assert session.pushed == 0  # nothing can be pushed into or out of the driver's own span
            assert session.carried == 6
        finally:
            await session.close()
        assert await generate(engine) == reference_generate(tiny_model_path, list(PROMPT), NEW_TOKENS)
    finally:
        await engine.close()
        own.servicer.close()


async def test_in_process_span_refuses_what_a_peer_would(tiny_model_path: Path) -> None:
    own = own_blocks(tiny_model_path)
    hop = Hop("me", "127.0.0.1:1", 0, 2)
    try:
        assert own.local.covers(hop)
        assert not own.local.covers(Hop("me", "127.0.0.1:1", 0, 3))  # blocks it does not hold
        assert not own.local.covers(Hop("other", "127.0.0.1:1", 0, 2))
        hidden = torch.randn(1, 3, 64)
        too_long = own.local.open(hop, max_length=own.local.max_length + 1)
        with pytest.raises(HopFailure, match="exceeds"):
            await too_long.step(hidden, position=0)
        span = own.local.open(hop, max_length=4)
        with pytest.raises(HopFailure, match="beyond"):  # skipping ahead of the cache
            await span.step(hidden, position=2)
        await span.step(hidden, position=0)
        with pytest.raises(InvalidRequestError, match="max_length"):  # overrunning the session: the driver's bug
            await span.step(hidden, position=3)
        with pytest.raises(HopFailure, match="cannot be pushed"):
            span.target()
        await span.close()
        await too_long.close()
        assert own.local.caches.active_sessions == 0
    finally:
        own.servicer.close()
