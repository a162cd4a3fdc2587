"""A private swarm: block servers refuse gRPC calls that lack the shared swarm token."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import torch

from node.blocks.auth import SWARM_TOKEN_ENV, call_metadata, swarm_token_from_env
from node.blocks.block_functions import BlockSpan
from node.blocks.chain_engine import ChainConfig, ChainEngine
from node.blocks.kv_cache import CacheManager
from node.blocks.loader import load_blocks, load_config
from node.blocks.push import PushChannels, PushTarget, StaticPushPolicy
from node.blocks.server import BlockServicer, ServerLimits, grpc_options, start_grpc_server
from node.engine import GenerationRequest
from proto import blocks_pb2, blocks_pb2_grpc
from proto.codec import encode_tensor
from proto.errors import NoRouteError
from proto.records import BlockRecord
from tests.helpers_node import FixedRecords, reference_generate

TOKEN = "s3cret-swarm"
PROMPT = (5, 17, 200, 33, 99)


@pytest.fixture
async def private_swarm(tiny_model_path: Path) -> AsyncIterator[list[BlockRecord]]:
    """Blocks 0:2 and 2:4 on two token-protected servers; the first pushes to the second with the token."""
    config = load_config(tiny_model_path)
    started, records = [], []
    for start, end in ((0, 2), (2, 4)):
        span = BlockSpan.create(config, load_blocks(tiny_model_path, config, start, end), start)
        servicer = BlockServicer(
            span=span, model_name="tiny", caches=CacheManager(budget_bytes=1 << 24, ttl_s=60), limits=ServerLimits(),
            push_channels=PushChannels(grpc_options(1 << 20), swarm_token=TOKEN),
        )
        server, port = await start_grpc_server(servicer, "127.0.0.1", 0, swarm_token=TOKEN)
        started.append((server, servicer))
        records.append(BlockRecord(peer_id=f"p{start}", address=f"127.0.0.1:{port}", group="g",
                                   start_block=start, end_block=end, throughput_tok_s=100.0))
    started[0][1].push_policy = StaticPushPolicy([records[1].address])
    yield records
    for server, servicer in started:
        await server.stop(grace=None)
        await servicer.aclose()


async def test_calls_without_the_right_token_are_unauthenticated(private_swarm: list[BlockRecord]) -> None:
    async with grpc.aio.insecure_channel(private_swarm[0].address) as channel:
        stub = blocks_pb2_grpc.BlockServiceStub(channel)
        for metadata in ((), call_metadata("wrong")):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Info(blocks_pb2.InfoRequest(), metadata=metadata)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            call = stub.Inference(metadata=metadata)
            await call.write(blocks_pb2.InferenceStep(session_id="s", model="tiny", start_block=0, end_block=2,
                                                      max_length=8, hidden=encode_tensor(torch.zeros(1, 1, 64))))
            assert await call.code() == grpc.StatusCode.UNAUTHENTICATED
        assert (await stub.Info(blocks_pb2.InfoRequest(), metadata=call_metadata(TOKEN))).end_block == 2


async def test_members_generate_with_pushes_and_strangers_find_no_route(
    tiny_model_path: Path, private_swarm: list[BlockRecord]
) -> None:
    member = ChainEngine(model_path=str(tiny_model_path), model_name="tiny", records=FixedRecords(private_swarm),
                         config=ChainConfig(swarm_token=TOKEN, push=True))
    stranger = ChainEngine(model_path=str(tiny_model_path), model_name="tiny", records=FixedRecords(private_swarm),
                           config=ChainConfig(swarm_token="", route_attempts=1))
    try:
        tokens, pushed = [], 0
        async for token in member.generate(GenerationRequest(prompt_ids=PROMPT, max_new_tokens=8)):
            tokens.append(token)
            pushed = max(pushed, *(s.pushed for s in member.sessions))
        assert tokens == reference_generate(tiny_model_path, list(PROMPT), 8)
        assert pushed > 0  # the server-to-server pushes carried the token too
        with pytest.raises(NoRouteError):  # its probes are refused, so no peer is usable
            await stranger.route(0, 4)
    finally:
        await member.close()
        await stranger.close()


async def test_a_push_without_the_token_is_refused_and_the_driver_hears_why(private_swarm) -> None:
    channels = PushChannels(grpc_options(1 << 20))  # no token
    link = channels.link(PushTarget(private_swarm[1].address, "nobody", 2, 4))
    try:
        await link.send(blocks_pb2.InferenceStep(session_id="nobody", position=0, step_id=1))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await link._call
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        await channels.close()


def test_the_token_comes_from_the_flag_or_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SWARM_TOKEN_ENV, "from-env")
    assert swarm_token_from_env() == "from-env"
    assert swarm_token_from_env("from-flag") == "from-flag"
    assert ChainConfig().swarm_token == "from-env"
    monkeypatch.delenv(SWARM_TOKEN_ENV)
    assert swarm_token_from_env() == ""
    for bad in ("has space", "x" * 300, "caf\u00e9"):
        with pytest.raises(ValueError):
            swarm_token_from_env(bad)
