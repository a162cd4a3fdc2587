"""Block compute, selective loading, KV caches and routing: pure logic, no network."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from node.blocks.block_functions import BlockSpan, run_span
from node.blocks.kv_cache import CacheFullError, CacheManager, CacheSpec, SessionCache
from node.blocks.loader import load_blocks, load_config, load_driver_parts
from node.blocks.routing import find_route
from proto.errors import NoRouteError
from proto.records import BlockRecord

PROMPT = [5, 17, 200, 33, 99, 12, 7, 8]


@pytest.fixture(scope="module")
def full_model(tiny_model_path: Path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(tiny_model_path).eval()


@pytest.fixture(scope="module")
def halves(tiny_model_path: Path) -> tuple[BlockSpan, BlockSpan]:
    config = load_config(tiny_model_path)
    mid = config.num_hidden_layers // 2
    return (
        BlockSpan.create(config, load_blocks(tiny_model_path, config, 0, mid), 0),
        BlockSpan.create(config, load_blocks(tiny_model_path, config, mid, config.num_hidden_layers), mid),
    )


def test_loader_reads_only_the_requested_blocks(tiny_model_path: Path) -> None:
    config = load_config(tiny_model_path)
    layers = load_blocks(tiny_model_path, config, 1, 3)
    assert [layer.self_attn.layer_idx for layer in layers] == [1, 2]
    per_layer = sum(p.numel() for p in layers[0].parameters())
    assert sum(p.numel() for p in layers.parameters()) == 2 * per_layer  # no embeddings, no head
    with pytest.raises(ValueError, match="outside"):
        load_blocks(tiny_model_path, config, 2, 99)


def test_two_spans_with_caches_reproduce_generate_and_hidden_states(
    tiny_model_path: Path, full_model, halves: tuple[BlockSpan, BlockSpan]
) -> None:
    driver = load_driver_parts(tiny_model_path, load_config(tiny_model_path))
    reference = full_model.generate(torch.tensor([PROMPT]), max_new_tokens=16, do_sample=False)[0, len(PROMPT):]
    caches = [SessionCache(s.cache_spec(s.start, s.end, batch=1, max_length=64)) for s in halves]

    def through(x: torch.Tensor) -> torch.Tensor:
        for span, cache in zip(halves, caches, strict=True):
            x = run_span(span, x, position=cache.length, cache=cache)
        return x

    hidden = through(driver.embed_ids(torch.tensor([PROMPT])))
    with torch.no_grad():
        expected = full_model.model(torch.tensor([PROMPT])).last_hidden_state
    assert torch.allclose(driver.norm(hidden), expected, atol=1e-5)
    tokens = []
    for _ in range(16):
        tokens.append(int(driver.logits(hidden)[0, -1].argmax()))
        hidden = through(driver.embed_ids(torch.tensor([[tokens[-1]]])))
    assert tokens == reference.tolist()


def test_multi_token_steps_at_an_offset_match_one_pass(halves: tuple[BlockSpan, BlockSpan]) -> None:
    """Replay, chunked prefill and speculative verification all send several tokens after a cache."""
    span = halves[1]  # a middle-of-model span: rotary positions must follow the offset
    x = torch.randn(1, 13, span.hidden_size, generator=torch.Generator().manual_seed(0))
    one_pass = run_span(span, x)
    cache = SessionCache(span.cache_spec(span.start, span.end, batch=1, max_length=16))
    parts = [run_span(span, x[:, a:b], position=a, cache=cache) for a, b in ((0, 5), (5, 12), (12, 13))]
    assert torch.allclose(torch.cat(parts, dim=1), one_pass, atol=1e-5)
    cache.truncate(5)  # roll back 8 tokens and recompute them
    again = run_span(span, x[:, 5:13], position=5, cache=cache)
    assert torch.allclose(again, one_pass[:, 5:13], atol=1e-5)


def test_cache_manager_enforces_budget_and_ttl() -> None:
    now = [0.0]
    spec = CacheSpec(first_layer=0, num_layers=2, batch=1, kv_heads=2, head_dim=16, max_length=100)
    manager = CacheManager(budget_bytes=2 * spec.nbytes, ttl_s=10.0, clock=lambda: now[0])
    manager.allocate("a", spec)
    manager.allocate("b", spec)
    with pytest.raises(CacheFullError, match="try another peer"):
        manager.allocate("c", spec)
    now[0] = 5.0
    assert manager.get("a") is not None  # touching "a" keeps it alive
    now[0] = 12.0
    manager.allocate("c", spec)  # "b" idled past the TTL and was dropped to make room
    assert manager.get("b") is None and manager.active_sessions == 2
    manager.free("a")
    assert manager.free_bytes == spec.nbytes


def record(peer: str, start: int, end: int, *, tok_s: float = 100.0, load: float = 0.0) -> BlockRecord:
    return BlockRecord(peer_id=peer, address=f"{peer}:1", group="g", start_block=start, end_block=end,
                       throughput_tok_s=tok_s, load=load)


def test_route_covers_all_blocks_and_prefers_fast_close_peers() -> None:
    servers = [record("a", 0, 6), record("b", 6, 12), record("slow", 0, 12, tok_s=5.0), record("c", 4, 12)]
    route = find_route(servers, start=0, end=12, rtt_ms={"a": 1, "b": 1, "c": 30, "slow": 1})
    assert [(h.peer_id, h.start, h.end) for h in route] == [("a", 0, 6), ("b", 6, 12)]
    # a sub-range, without two peers: "c" computes faster per block, so it takes over as early as it can
    route = find_route(servers, start=3, end=9, exclude=["b", "slow"])
    assert [(h.peer_id, h.start, h.end) for h in route] == [("a", 3, 4), ("c", 4, 9)]


def test_route_spreads_requests_across_equal_replicas_and_avoids_loaded_ones() -> None:
    rng = random.Random(0)
    servers = [record("a", 0, 2), record("r1", 2, 4), record("r2", 2, 4)]
    picks = [find_route(servers, start=0, end=4, rng=rng)[1].peer_id for _ in range(200)]
    assert 60 < picks.count("r1") < 140
    servers[2] = record("r2", 2, 4, load=0.9)
    picks = [find_route(servers, start=0, end=4, rng=rng)[1].peer_id for _ in range(50)]
    assert picks.count("r1") == 50


def test_no_route_names_the_missing_blocks() -> None:
    servers = [record("a", 0, 2), record("b", 4, 6), record("c", 2, 4)]
    with pytest.raises(NoRouteError) as info:
        find_route(servers, start=0, end=8, model="m", exclude=["c"])
    assert info.value.missing_blocks == [2, 3, 6, 7]
    assert "2:4, 6:8" in str(info.value) and info.value.code_name == "NO_ROUTE"


def test_swarm_summary_shows_coverage_and_gaps() -> None:
    from node.blocks.swarm import summarize
    from proto.records import NodeRecord

    def node(peer: str, start: int, end: int) -> NodeRecord:
        return NodeRecord(peer_id=peer, address=f"{peer}:1", group="g", models=("m",), start_block=start,
                          end_block=end, num_blocks=8)

    summary = summarize([node("a", 0, 3), node("b", 2, 4), node("c", 6, 7)])
    assert summary["models"]["m"]["servers_per_block"] == [1, 1, 2, 1, 0, 0, 1, 0]
    assert summary["models"]["m"]["gaps"] == ["4:6", "7:8"] and not summary["models"]["m"]["complete"]
