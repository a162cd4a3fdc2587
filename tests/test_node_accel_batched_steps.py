"""Batched steps (BlockService.InferenceBatch): one message per hop for all of a driver's sessions.

Checked over real gRPC servers: greedy output stays identical to the whole model while sessions of
different lengths join and leave, each session keeps its own cache, a bad step fails its session
only, and a driver falls back to per-session streams on servers without the rpc.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch

from node.accel.batch_link import split_groups
from node.accel.chain import AccelChain, Hop
from node.accel.executor import ModelHead
from node.engine import GenerationRequest
from proto import blocks_pb2, blocks_pb2_grpc
from proto.codec import decode_tensor, encode_tensor
from tests.helpers_accel import MODEL_NAME, accel_chain, collect, plain_servers, reference_greedy

PROMPTS = [
    (5, 77, 300, 12, 99, 100, 7, 8) * 3,
    tuple(range(40, 80)),
    (11, 12, 13, 14) * 3,
    (200, 3, 17),
    tuple(range(300, 310)),
    (9,) * 7,
]
LENGTHS = [20, 5, 13, 20, 1, 9]  # sessions leave at different steps while the others go on


@pytest.fixture(scope="module")
def expected(tiny_model_path):
    full = reference_greedy(tiny_model_path, PROMPTS, max(LENGTHS))
    return [out[:n] for out, n in zip(full, LENGTHS, strict=True)]


def request(i: int, method: str = "continuous_batching") -> GenerationRequest:
    return GenerationRequest(prompt_ids=PROMPTS[i], max_new_tokens=LENGTHS[i], method=method)


async def test_sessions_join_and_leave_with_identical_greedy_output(tiny_model_path, expected):
    async with accel_chain(tiny_model_path) as chain:
        outs = await asyncio.gather(*(collect(chain.driver, request(i)) for i in range(len(PROMPTS))))
        assert outs == expected
        # late joiners while others are mid-generation
        first = [asyncio.create_task(collect(chain.driver, request(i))) for i in (0, 3)]
        await asyncio.sleep(0)
        late = await asyncio.gather(*(collect(chain.driver, request(i)) for i in (1, 2, 5)))
        assert late == [expected[i] for i in (1, 2, 5)]
        assert [await t for t in first] == [expected[0], expected[3]]
        for server in chain.servers:
            assert server.servicer.batch_messages > 0  # the steps went in batched messages
            assert server.servicer.batcher.stats.max_batch > 1
        await chain.driver.close()  # ends the batched streams: every session and reservation is released
        for server in chain.servers:
            for _ in range(100):
                if server.servicer.active_sessions == 0:
                    break
                await asyncio.sleep(0.01)
            assert server.servicer.active_sessions == 0
            assert server.servicer.reserved_bytes == 0


def _step(session: str, hidden: torch.Tensor | None, position: int, *, close: bool = False,
          end: int = 2) -> blocks_pb2.InferenceStep:
    step = blocks_pb2.InferenceStep(session_id=session, model=MODEL_NAME, start_block=0, end_block=end,
                                    position=position, max_length=64, close=close)
    if hidden is not None:
        step.hidden.CopyFrom(encode_tensor(hidden))
    return step


async def test_a_bad_step_fails_its_session_only_and_caches_stay_separate(tiny_model_path):
    torch.manual_seed(0)
    a0, a1 = torch.randn(1, 3, 64), torch.randn(1, 1, 64)
    b0 = torch.randn(1, 2, 64)
    async with accel_chain(tiny_model_path) as chain:
        server = chain.servers[0]
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = blocks_pb2_grpc.BlockServiceStub(channel)
            # reference: session a alone on a per-session stream
            ref = stub.Inference()
            await ref.write(_step("ref", a0, 0))
            ref0 = decode_tensor((await ref.read()).hidden)
            await ref.write(_step("ref", a1, 3))
            ref1 = decode_tensor((await ref.read()).hidden)
            await ref.done_writing()

            call = stub.InferenceBatch()
            await call.write(blocks_pb2.StepBatch(steps=[
                _step("a", a0, 0),
                _step("bad", torch.zeros(1, 2, 32), 0),  # wrong hidden size
                _step("far", torch.zeros(1, 1, 64), 0, end=1),  # a span this node does not serve
                _step("b", b0, 0),
            ]))
            reply = await call.read()
            assert [r.session_id for r in reply.results] == ["a", "bad", "far", "b"]
            assert reply.results[1].error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
            assert reply.results[2].error_code == grpc.StatusCode.NOT_FOUND.value[0]
            assert reply.results[0].error_code == 0 and reply.results[0].result.position == 3
            assert torch.allclose(decode_tensor(reply.results[0].result.hidden), ref0, atol=1e-5)
            assert reply.results[3].result.position == 2
            # b leaves, c joins, a goes on with its own cache
            await call.write(blocks_pb2.StepBatch(steps=[
                _step("b", None, 0, close=True), _step("c", torch.randn(1, 1, 64), 0), _step("a", a1, 3),
            ]))
            reply = await call.read()
            assert [r.error_code for r in reply.results] == [0, 0, 0]
            assert reply.results[2].result.position == 4
            assert torch.allclose(decode_tensor(reply.results[2].result.hidden), ref1, atol=1e-5)
            assert server.servicer.active_sessions == 2  # a and c
            # a step past the session's cache fails that session and closes it
            await call.write(blocks_pb2.StepBatch(steps=[_step("c", torch.randn(1, 1, 64), 5)]))
            reply = await call.read()
            assert reply.results[0].error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
            assert server.servicer.active_sessions == 1
            # two steps of one session in one message: the message is refused
            await call.write(blocks_pb2.StepBatch(steps=[_step("a", a1, 4), _step("a", a1, 4)]))
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call.read()
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        for _ in range(100):
            if server.servicer.active_sessions == 0:
                break
            await asyncio.sleep(0.01)
        assert server.servicer.active_sessions == 0 and server.servicer.reserved_bytes == 0


async def test_plain_block_servers_get_per_session_streams(tiny_model_path, expected):
    async with plain_servers(tiny_model_path, [(0, 2), (2, 4)]) as spans:
        driver = AccelChain(model_name=MODEL_NAME, head=ModelHead.load(tiny_model_path),
                            hops=[Hop(a, s, e) for a, s, e in spans])
        try:
            outs = await asyncio.gather(*(collect(driver, request(i)) for i in range(3)))
            assert outs == expected[:3]
            assert all(link.unsupported for link in driver._links.values())
        finally:
            await driver.close()


def test_split_groups_gives_each_hop_one_group():
    items = list(range(16))
    assert split_groups(items, sessions=16, depth=2) == [items[:8], items[8:]]
    assert split_groups(items[:8], sessions=16, depth=2) == [items[:8]]  # a group is never split again
    assert split_groups(items[:7], sessions=7, depth=2) == [items[:4], items[4:7]]
    assert split_groups(items, sessions=16, depth=1) == [items]
