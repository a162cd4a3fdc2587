"""The gRPC BlockService of one node, over a real gRPC server on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import torch

from node.blocks.block_functions import BlockSpan, run_span
from node.blocks.kv_cache import CacheManager
from node.blocks.loader import load_blocks, load_config
from node.blocks.server import BlockServicer, ServerLimits, grpc_options, start_grpc_server
from proto import blocks_pb2, blocks_pb2_grpc
from proto.codec import decode_tensor, encode_tensor

MAX_LENGTH = 64


@pytest.fixture
async def node(tiny_model_path: Path) -> AsyncIterator[tuple[BlockSpan, blocks_pb2_grpc.BlockServiceStub]]:
    config = load_config(tiny_model_path)
    span = BlockSpan.create(config, load_blocks(tiny_model_path, config, 1, 3), 1)
    one_session = span.cache_spec(1, 3, batch=1, max_length=MAX_LENGTH).nbytes
    servicer = BlockServicer(
        span=span, model_name="tiny", caches=CacheManager(budget_bytes=int(1.5 * one_session), ttl_s=60),
        limits=ServerLimits(max_batch=2, max_length=128, max_sessions_per_peer=3),
    )
    server, port = await start_grpc_server(servicer, "127.0.0.1", 0)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=grpc_options(1 << 20))
    yield span, blocks_pb2_grpc.BlockServiceStub(channel)
    await channel.close()
    await server.stop(grace=None)
    servicer.close()


def opening(session: str, hidden: torch.Tensor, **fields: object) -> blocks_pb2.InferenceStep:
    values: dict = {"model": "tiny", "start_block": 1, "end_block": 3, "max_length": MAX_LENGTH, **fields}
    return blocks_pb2.InferenceStep(session_id=session, hidden=encode_tensor(hidden), **values)


async def test_session_steps_and_forward_compute_the_blocks(node) -> None:
    span, stub = node
    x = torch.randn(1, 6, span.hidden_size)
    call = stub.Inference()
    await call.write(opening("s1", x[:, :5]))
    first = await call.read()
    await call.write(blocks_pb2.InferenceStep(hidden=encode_tensor(x[:, 5:]), position=5))
    second = await call.read()
    assert second.position == 6
    streamed = torch.cat([decode_tensor(first.hidden), decode_tensor(second.hidden)], dim=1)
    assert torch.allclose(streamed, run_span(span, x), atol=1e-5)
    info = await stub.Info(blocks_pb2.InfoRequest())
    assert (info.start_block, info.end_block, info.num_blocks, info.active_sessions) == (1, 3, 4, 1)
    await call.done_writing()
    forward = await stub.Forward(blocks_pb2.ForwardRequest(model="tiny", start_block=2, end_block=3,
                                                           hidden=encode_tensor(x)))
    assert torch.allclose(decode_tensor(forward.hidden), run_span(span, x, start=2, end=3), atol=1e-5)
    call.cancel()


async def test_full_node_and_bad_tensors_end_only_the_offending_stream(node) -> None:
    span, stub = node
    h = span.hidden_size
    healthy = stub.Inference()
    await healthy.write(opening("healthy", torch.randn(1, 3, h)))
    await healthy.read()

    async def rejected(message: blocks_pb2.InferenceStep) -> grpc.StatusCode:
        call = stub.Inference()
        await call.write(message)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call.read()
        return info.value.code()

    # the budget holds one session of MAX_LENGTH: a second one is refused, not queued
    assert await rejected(opening("second", torch.randn(1, 3, h))) == grpc.StatusCode.RESOURCE_EXHAUSTED
    small = {"max_length": 4}  # fits next to the healthy session, so only the tensor is wrong
    nan = torch.randn(1, 2, h)
    nan[0, 1, 3] = float("nan")
    assert await rejected(opening("nan", nan, **small)) == grpc.StatusCode.INVALID_ARGUMENT
    assert await rejected(opening("width", torch.randn(1, 2, h + 1), **small)) == grpc.StatusCode.INVALID_ARGUMENT
    ints = opening("dtype", torch.ones(1, 2, h, dtype=torch.int64), **small)
    assert await rejected(ints) == grpc.StatusCode.INVALID_ARGUMENT
    truncated = opening("bytes", torch.randn(1, 2, h), **small)
    truncated.hidden.data = truncated.hidden.data[:-4]
    assert await rejected(truncated) == grpc.StatusCode.INVALID_ARGUMENT
    assert await rejected(opening("long", torch.randn(1, 5, h), **small)) == grpc.StatusCode.OUT_OF_RANGE
    assert await rejected(opening("model", torch.randn(1, 2, h), model="other")) == grpc.StatusCode.NOT_FOUND

    # one peer host may hold only max_sessions_per_peer (3) sessions, however much cache is free
    tiny = [stub.Inference() for _ in range(2)]
    for number, call in enumerate(tiny):
        await call.write(opening(f"tiny{number}", torch.randn(1, 1, h), max_length=1))
        await call.read()
    assert await rejected(opening("fourth", torch.randn(1, 1, h), max_length=1)) == grpc.StatusCode.RESOURCE_EXHAUSTED
    for call in tiny:
        call.cancel()

    await healthy.write(blocks_pb2.InferenceStep(hidden=encode_tensor(torch.randn(1, 1, h)), position=3))
    assert (await healthy.read()).position == 4
    healthy.cancel()
