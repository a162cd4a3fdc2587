"""Every lossless method over a real 2-node gRPC chain gives exactly what transformers greedy generate gives."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch

from node.accel.batching import BatchPolicy
from node.accel.speculative import DraftModelDrafter
from node.engine import GenerationRequest
from proto import blocks_pb2, blocks_pb2_grpc
from proto.codec import encode_tensor
from tests.helpers_accel import MODEL_NAME, accel_chain, collect, reference_greedy

NEW_TOKENS = 20
PROMPTS = [
    (5, 77, 300, 12, 99, 100, 7, 8) * 3,  # repetitive: prompt lookup finds drafts
    tuple(range(40, 80)),
    (11, 12, 13, 14) * 3,
]
LOSSLESS = [
    "baseline", "dynamic_batching", "continuous_batching", "prefix_caching", "chunked_prefill", "spec_ngram",
    "spec_draft", "all",
]


@pytest.fixture(scope="module")
def expected(tiny_model_path):
    return reference_greedy(tiny_model_path, PROMPTS, NEW_TOKENS)


def request(prompt, method: str) -> GenerationRequest:
    return GenerationRequest(prompt_ids=tuple(prompt), max_new_tokens=NEW_TOKENS, method=method)


@pytest.mark.parametrize("method", LOSSLESS)
async def test_concurrent_greedy_requests_match_the_whole_model(tiny_model_path, expected, method):
    async with accel_chain(tiny_model_path) as chain:
        outs = await asyncio.gather(*(collect(chain.driver, request(p, method)) for p in PROMPTS))
        assert outs == expected
        # and once more, now that the prefix caches are warm
        outs = await asyncio.gather(*(collect(chain.driver, request(p, method)) for p in PROMPTS))
        assert outs == expected
        stats = [s.servicer.batcher.stats for s in chain.servers]
        if method in ("baseline", "prefix_caching", "chunked_prefill", "spec_ngram", "spec_draft"):
            assert all(s.max_batch == 1 for s in stats)  # these run every step alone
        if method in ("continuous_batching", "dynamic_batching", "all"):
            assert all(s.max_batch > 1 for s in stats)  # steps of different sessions shared forwards
        if method in ("prefix_caching", "all"):
            for server in chain.servers:  # every node of the chain reused the prompts' prefixes
                assert server.servicer.prefix_cache.stats.hits > 0


async def test_prefix_reuse_skips_the_shared_prefix_on_every_hop(tiny_model_path, expected):
    async with accel_chain(tiny_model_path, prefix_block_tokens=8) as chain:
        assert await collect(chain.driver, request(PROMPTS[1], "prefix_caching")) == expected[1]
        before = [s.servicer.batcher.stats.steps for s in chain.servers]
        shared = (*PROMPTS[1][:32], 3, 4, 5)  # 4 cached blocks of 8, then a new tail
        ref = reference_greedy(tiny_model_path, [shared], NEW_TOKENS)[0]
        assert await collect(chain.driver, request(shared, "prefix_caching")) == ref
        for server in chain.servers:
            assert server.servicer.prefix_cache.stats.hits >= 4
        assert [s.servicer.batcher.stats.steps for s in chain.servers] == [b + NEW_TOKENS for b in before]


async def test_speculative_decoding_needs_fewer_chain_passes(tiny_model_path, expected):
    async with accel_chain(tiny_model_path) as chain:
        assert await collect(chain.driver, request(PROMPTS[0], "baseline")) == expected[0]
        baseline_passes = chain.servers[0].servicer.batcher.stats.steps
        assert await collect(chain.driver, request(PROMPTS[0], "spec_ngram")) == expected[0]
        spec_passes = chain.servers[0].servicer.batcher.stats.steps - baseline_passes
        assert spec_passes < baseline_passes


async def test_draft_model_drafts_are_verified_in_one_pass(tiny_model_path, expected):
    from transformers import LlamaForCausalLM

    draft = LlamaForCausalLM.from_pretrained(tiny_model_path).eval()  # the model drafts for itself: all accepted
    async with accel_chain(tiny_model_path) as chain:
        chain.driver.draft_drafter = lambda: DraftModelDrafter(draft)
        assert await collect(chain.driver, request(PROMPTS[1], "spec_draft")) == expected[1]
        # 1 prefill + ceil(19 / 5) verification passes instead of 20
        assert chain.servers[0].servicer.batcher.stats.steps <= 1 + 4


async def test_chunked_prefill_interleaves_with_other_sessions_decode_steps(tiny_model_path, expected):
    policy = BatchPolicy(max_seqs=16, max_tokens=16)
    async with accel_chain(tiny_model_path, policy=policy) as chain:
        long_prompt = tuple(range(100, 228))
        ref = reference_greedy(tiny_model_path, [long_prompt], 4)[0]
        decoding = asyncio.create_task(collect(chain.driver, request(PROMPTS[2], "continuous_batching")))
        await asyncio.sleep(0.05)
        chunked = GenerationRequest(prompt_ids=long_prompt, max_new_tokens=4, method="all")
        assert await collect(chain.driver, chunked) == ref
        assert await decoding == expected[2]
        assert chain.servers[0].servicer.batcher.stats.forwards >= 128 // 16


async def test_bad_tensors_and_a_full_node_get_typed_errors_without_disturbing_others(tiny_model_path, expected):
    budget = 2 * 2 * 2 * 16 * 4 * 400  # 2 layers x (k, v) x 2 kv heads x 16 dims x 4 bytes x 400 tokens
    async with accel_chain(tiny_model_path, cache_budget_bytes=budget) as chain:
        server = chain.servers[0]
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = blocks_pb2_grpc.BlockServiceStub(channel)
            bad = [
                torch.full((1, 2, 64), float("nan")),  # not finite
                torch.zeros(1, 2, 32),  # wrong hidden size
                torch.zeros(2, 64),  # wrong rank
            ]
            for hidden in bad:
                call = stub.Inference()
                await call.write(blocks_pb2.InferenceStep(model=MODEL_NAME, start_block=0, end_block=2,
                                                          hidden=encode_tensor(hidden), max_length=64))
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await call.read()
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            call = stub.Inference()  # blocks this node does not serve as one span: the driver must route elsewhere
            await call.write(blocks_pb2.InferenceStep(model=MODEL_NAME, start_block=0, end_block=1,
                                                      hidden=encode_tensor(torch.zeros(1, 1, 64)), max_length=64))
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call.read()
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
            call = stub.Inference()
            await call.write(blocks_pb2.InferenceStep(model=MODEL_NAME, start_block=0, end_block=2,
                                                      hidden=encode_tensor(torch.zeros(1, 1, 64)), max_length=5000))
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call.read()
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # over the node's max_session_length
            hog = stub.Inference()  # holds 300 of the 400 tokens of budget
            await hog.write(blocks_pb2.InferenceStep(model=MODEL_NAME, start_block=0, end_block=2,
                                                     hidden=encode_tensor(torch.zeros(1, 1, 64)), max_length=300))
            await hog.read()
            call = stub.Inference()
            await call.write(blocks_pb2.InferenceStep(model=MODEL_NAME, start_block=0, end_block=2,
                                                      hidden=encode_tensor(torch.zeros(1, 1, 64)), max_length=200))
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call.read()
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            # a normal request still fits and is still exact
            assert await collect(chain.driver, request(PROMPTS[2], "continuous_batching")) == expected[2]
            await hog.done_writing()
