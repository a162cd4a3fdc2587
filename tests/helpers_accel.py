"""Shared helpers for the acceleration-method tests: real gRPC block servers on loopback, reference greedy output."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from node.accel.batching import BatchPolicy
from node.accel.chain import AccelChain, Hop
from node.accel.executor import ModelHead
from node.accel.server import AccelBlockServer, AccelServerConfig
from node.engine import GenerationRequest

MODEL_NAME = "tiny"


@dataclass
class Chain:
    servers: list[AccelBlockServer]
    driver: AccelChain


@contextlib.asynccontextmanager
async def accel_chain(
    model_path: Path,
    splits: Sequence[tuple[int, int]] = ((0, 2), (2, 4)),
    *,
    policy: BatchPolicy | None = None,
    weight_format: str = "fp32",
    prefix_block_tokens: int = 8,
    cache_budget_bytes: int = 256 * 1024 * 1024,
) -> AsyncIterator[Chain]:
    """Start one accelerated block server per split and a driver over them; stop everything afterwards."""
    servers: list[AccelBlockServer] = []
    driver: AccelChain | None = None
    try:
        for start, end in splits:
            config = AccelServerConfig(
                model_path=model_path,
                model_name=MODEL_NAME,
                start=start,
                end=end,
                weight_format=weight_format,
                policy=policy or BatchPolicy(),
                prefix_block_tokens=prefix_block_tokens,
                cache_budget_bytes=cache_budget_bytes,
            )
            servers.append(await AccelBlockServer.create(config))
        path: list[Hop] = []  # the first server of each span, when replicas are started too
        for server in servers:
            if server.config.start == (path[-1].end if path else 0):
                path.append(Hop(server.address, server.config.start, server.config.end))
        driver = AccelChain(
            model_name=MODEL_NAME,
            head=ModelHead.load(model_path),
            hops=path,
            prefix_block_tokens=prefix_block_tokens,
        )
        yield Chain(servers, driver)
    finally:
        if driver is not None:
            await driver.close()
        for server in servers:
            await server.close(grace=0.1)


async def collect(chain: AccelChain, request: GenerationRequest) -> list[int]:
    return [token async for token in chain.generate(request)]


def reference_greedy(model_path: Path, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
    """What ``transformers`` greedy ``generate`` produces for the whole model on one machine."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_path).eval()
    out = []
    for prompt in prompts:
        ids = torch.tensor([list(prompt)])
        with torch.inference_mode():
            generated = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                eos_token_id=None, pad_token_id=0,
            )
        out.append(generated[0, len(prompt) :].tolist())
    return out


@contextlib.asynccontextmanager
async def plain_servers(
    model_path: Path, splits: Sequence[tuple[int, int]]
) -> AsyncIterator[list[tuple[str, int, int]]]:
    """node.blocks' own (non-accelerated) block servers in this process; yields (address, start, end) each."""
    from node.blocks.block_functions import BlockSpan
    from node.blocks.kv_cache import CacheManager
    from node.blocks.loader import load_blocks, load_config
    from node.blocks.server import BlockServicer, ServerLimits, start_grpc_server

    config = load_config(model_path)
    started = []
    try:
        for start, end in splits:
            span = BlockSpan.create(config, load_blocks(model_path, config, start, end), start)
            servicer = BlockServicer(span=span, model_name=MODEL_NAME, caches=CacheManager(
                budget_bytes=64 * 1024 * 1024, ttl_s=60.0, max_sessions=64), limits=ServerLimits())
            server, port = await start_grpc_server(servicer, "127.0.0.1", 0)
            started.append((server, servicer, f"127.0.0.1:{port}", start, end))
        yield [(address, start, end) for _, _, address, start, end in started]
    finally:
        for server, servicer, *_ in started:
            await server.stop(grace=None)
            servicer.close()
