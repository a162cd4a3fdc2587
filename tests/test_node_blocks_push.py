"""Server-to-server push between two real gRPC block servers on loopback, and what a node
refuses to follow: routes are input from a peer like any other."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch

from node.blocks.block_functions import BlockSpan, run_span
from node.blocks.kv_cache import CacheManager
from node.blocks.loader import load_blocks, load_config
from node.blocks.push import PushTarget, RouteError, StaticPushPolicy, SwarmPushPolicy, check_address, parse_route
from node.blocks.server import BlockServicer, ServerLimits, grpc_options, start_grpc_server
from proto import blocks_pb2, blocks_pb2_grpc
from proto.codec import decode_tensor, encode_tensor
from proto.records import BlockRecord

MAX_LENGTH = 32


@dataclass
class Node:
    span: BlockSpan
    address: str
    stub: blocks_pb2_grpc.BlockServiceStub
    servicer: BlockServicer


@pytest.fixture
async def pair(tiny_model_path: Path) -> AsyncIterator[tuple[Node, Node]]:
    """Node A serves blocks 0:2 and may push to B (2:4); B may push nowhere."""
    config = load_config(tiny_model_path)
    started, nodes = [], []
    for start, end in ((0, 2), (2, 4)):
        span = BlockSpan.create(config, load_blocks(tiny_model_path, config, start, end), start)
        servicer = BlockServicer(span=span, model_name="tiny", caches=CacheManager(budget_bytes=1 << 24, ttl_s=60),
                                 limits=ServerLimits())
        server, port = await start_grpc_server(servicer, "127.0.0.1", 0)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=grpc_options(1 << 20))
        started.append((server, servicer, channel))
        nodes.append(Node(span, f"127.0.0.1:{port}", blocks_pb2_grpc.BlockServiceStub(channel), servicer))
    a, b = nodes
    a.servicer.push_policy = StaticPushPolicy([b.address])
    b.servicer.push_policy = StaticPushPolicy([])
    yield a, b
    for server, servicer, channel in started:
        await channel.close()
        await server.stop(grace=None)
        await servicer.aclose()


def opening(session: str, hidden: torch.Tensor, start: int, end: int) -> blocks_pb2.InferenceStep:
    return blocks_pb2.InferenceStep(session_id=session, model="tiny", start_block=start, end_block=end,
                                    max_length=MAX_LENGTH, hidden=encode_tensor(hidden), step_id=1)


def step(hidden: torch.Tensor, position: int, step_id: int, route=()) -> blocks_pb2.InferenceStep:
    return blocks_pb2.InferenceStep(hidden=encode_tensor(hidden), position=position, step_id=step_id,
                                    route=[t.to_proto() for t in route])


async def open_both(a: Node, b: Node, x: torch.Tensor):
    """Star-mode prefill of x on A then B; returns both streams."""
    call_a, call_b = a.stub.Inference(), b.stub.Inference()
    await call_a.write(opening("sa", x, 0, 2))
    mid = decode_tensor((await call_a.read()).hidden)
    await call_b.write(opening("sb", mid, 2, 4))
    await call_b.read()
    return call_a, call_b


async def test_a_pushed_step_reaches_the_next_hop_and_both_answer_the_driver(pair) -> None:
    a, b = pair
    x = torch.randn(1, 6, a.span.hidden_size)
    call_a, call_b = await open_both(a, b, x[:, :5])
    await call_a.write(step(x[:, 5:], 5, 2, [PushTarget(b.address, "sb", 2, 4)]))
    from_a, from_b = await call_a.read(), await call_b.read()  # B's step came from A, not from the driver
    assert from_a.pushed and not from_a.push_error and from_a.step_id == from_b.step_id == 2
    assert from_b.position == 6 and not from_b.pushed
    expected = run_span(b.span, run_span(a.span, x))[:, 5:]
    assert torch.allclose(decode_tensor(from_b.hidden), expected, atol=1e-5)
    assert torch.allclose(decode_tensor(from_a.hidden), run_span(a.span, x)[:, 5:], atol=1e-5)

    # the driver carries step 3 to B itself; a late push of an older step is then dropped, not applied
    await call_b.write(step(decode_tensor(from_a.hidden), 5, 3))
    assert (await call_b.read()).step_id == 3
    push = b.stub.Push()
    await push.write(blocks_pb2.InferenceStep(session_id="sb", hidden=from_a.hidden, position=5, step_id=2))
    await push.done_writing()
    assert (await push).steps == 1
    await call_b.write(step(decode_tensor(from_a.hidden), 6, 4))
    assert (await call_b.read()).step_id == 4  # nothing from the stale push came in between


async def test_a_target_the_node_does_not_know_is_not_followed(pair) -> None:
    a, b = pair
    x = torch.randn(1, 5, a.span.hidden_size)
    call_a, call_b = await open_both(a, b, x[:, :4])
    stranger = PushTarget("127.0.0.1:9", "sb", 2, 4)  # not a peer A may push to
    await call_a.write(step(x[:, 4:], 4, 2, [stranger]))
    reply = await call_a.read()
    assert not reply.pushed and "not a peer" in reply.push_error
    assert torch.allclose(decode_tensor(reply.hidden), run_span(a.span, x)[:, 4:], atol=1e-5)  # still answered
    await call_b.done_writing()


@pytest.mark.parametrize("route", [
    [PushTarget("127.0.0.1:1", "sb", 1, 4)],  # does not continue at A's end (block 2)
    [PushTarget("127.0.0.1:1", "sb", 2, 3), PushTarget("127.0.0.1:1", "sc", 2, 4)],  # goes back: a loop
    [PushTarget("127.0.0.1:1", "sb", 2, 9)],  # past the model's 4 blocks
    [PushTarget("no port", "sb", 2, 4)],
    [PushTarget("127.0.0.1:1", "", 2, 4)],
    "unnumbered",  # a valid route on a step without a step_id
])
async def test_malformed_routes_end_the_stream_with_invalid_argument(pair, route) -> None:
    a, _ = pair
    x = torch.randn(1, 5, a.span.hidden_size)
    call = a.stub.Inference()
    await call.write(opening("sx", x[:, :4], 0, 2))
    await call.read()
    if route == "unnumbered":
        await call.write(step(x[:, 4:], 4, 0, [PushTarget("127.0.0.1:1", "sb", 2, 4)]))
    else:
        await call.write(step(x[:, 4:], 4, 2, route))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call.read()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_push_into_a_session_not_open_here_is_refused(pair) -> None:
    _, b = pair
    push = b.stub.Push()
    await push.write(blocks_pb2.InferenceStep(session_id="nobody", hidden=encode_tensor(torch.zeros(1, 1, 64)),
                                              position=0, step_id=1))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await push
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_bad_pushed_step_is_reported_to_the_sessions_driver(pair) -> None:
    a, b = pair
    x = torch.randn(1, 4, a.span.hidden_size)
    _, call_b = await open_both(a, b, x)
    push = b.stub.Push()
    await push.write(blocks_pb2.InferenceStep(session_id="sb", hidden=encode_tensor(torch.zeros(1, 1, 64)),
                                              position=9, step_id=5))  # beyond B's 4 cached tokens
    reply = await call_b.read()
    assert reply.step_id == 5 and reply.rejected.startswith("FAILED_PRECONDITION") and not reply.HasField("hidden")
    push.cancel()


def test_addresses_must_be_host_and_port() -> None:
    for good in ("127.0.0.1:5000", "[::1]:5000", "node-3.example.org:443"):
        assert check_address(good) == good
    for bad in ("127.0.0.1", "127.0.0.1:0", "127.0.0.1:70000", ":5000", "a b:1", "x" * 300 + ":1"):
        with pytest.raises(RouteError):
            check_address(bad)
    route = [PushTarget(f"127.0.0.1:{1000 + i}", f"s{i}", i + 1, i + 2).to_proto() for i in range(5)]
    with pytest.raises(RouteError):  # more hops than the model has blocks
        parse_route(route, after=1, num_blocks=4)


async def test_swarm_policy_allows_only_dht_listed_peers_for_those_blocks() -> None:
    records = [BlockRecord(peer_id="p", address="10.0.0.2:7000", group="g", start_block=2, end_block=6)]

    async def lookup(model: str) -> list[BlockRecord]:
        return records if model == "m" else []

    policy = SwarmPushPolicy(lookup)
    assert await policy.allows("m", PushTarget("10.0.0.2:7000", "s", 2, 4))
    assert await policy.allows("m", PushTarget("10.0.0.2:7000", "s", 4, 6))
    assert not await policy.allows("m", PushTarget("10.0.0.2:7000", "s", 1, 4))  # blocks it does not serve
    assert not await policy.allows("m", PushTarget("10.0.0.9:7000", "s", 2, 4))  # an address nobody announced
    assert not await policy.allows("other", PushTarget("10.0.0.2:7000", "s", 2, 4))
