"""spec_draft on the sharded driver: a configured draft model reaches ChainEngine's accel driver, is validated at
start (ChainEngine and ``dinet-node run``), and spec_draft is offered only with one."""

from __future__ import annotations

import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from node.__main__ import _node_config, build_parser, main
from node.accel.draft import DraftModelConfig, DraftModelError
from node.accel.integration import accel_chain_for
from node.blocks.block_functions import BlockSpan
from node.blocks.chain_engine import ChainConfig, ChainEngine
from node.blocks.kv_cache import CacheManager
from node.blocks.loader import load_blocks, load_config
from node.blocks.server import BlockServicer, ServerLimits, start_grpc_server
from node.daemon import NodeConfig
from node.engine import GenerationRequest
from node.model_builder import build_model
from proto.records import BlockRecord
from tests.helpers_node import FixedRecords, reference_generate

PROMPT = (5, 77, 300, 12, 99, 100, 7, 8, 5, 77, 300, 12)
NEW_TOKENS = 16
TOKEN = "draft-swarm-token"


@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A draft model for tiny: the tiny preset (tiny's tokenizer) with other weights, so some drafts are wrong.

    The ``draft`` preset cannot draft for tiny: it shares the *small* model's tokenizer (8192 ids, not 1024)."""
    return build_model(tmp_path_factory.mktemp("draft") / "tiny-seed1", "tiny", seed=1)


@pytest.fixture
def wrong_vocab(draft_dir: Path, tmp_path: Path) -> Path:
    wrong = tmp_path / "wrong-vocab"
    shutil.copytree(draft_dir, wrong)
    config = json.loads((wrong / "config.json").read_text())
    config["vocab_size"] += 1
    (wrong / "config.json").write_text(json.dumps(config))
    return wrong


@pytest.fixture
async def private_chain(tiny_model_path: Path) -> AsyncIterator[list[BlockRecord]]:
    """Blocks 0:2 and 2:4 on two plain block servers of a private swarm (they refuse calls without TOKEN)."""
    config = load_config(tiny_model_path)
    started, records = [], []
    for start, end in ((0, 2), (2, 4)):
        span = BlockSpan.create(config, load_blocks(tiny_model_path, config, start, end), start)
        servicer = BlockServicer(span=span, model_name="tiny", caches=CacheManager(budget_bytes=1 << 24, ttl_s=60),
                                 limits=ServerLimits())
        server, port = await start_grpc_server(servicer, "127.0.0.1", 0, swarm_token=TOKEN)
        started.append((server, servicer))
        records.append(BlockRecord(peer_id=f"p{start}", address=f"127.0.0.1:{port}", group="g",
                                   start_block=start, end_block=end, throughput_tok_s=100.0))
    yield records
    for server, servicer in started:
        await server.stop(grace=None)
        await servicer.aclose()


async def generate(engine: ChainEngine, method: str) -> list[int]:
    request = GenerationRequest(prompt_ids=PROMPT, max_new_tokens=NEW_TOKENS, method=method, eos_token_id=None)
    return [token async for token in engine.generate(request)]


async def test_spec_draft_with_a_draft_model_equals_greedy_in_a_private_swarm(
    tiny_model_path: Path, draft_dir: Path, private_chain: list[BlockRecord]
) -> None:
    engine = ChainEngine(model_path=str(tiny_model_path), model_name="tiny", records=FixedRecords(private_chain),
                         config=ChainConfig(swarm_token=TOKEN, draft_model=DraftModelConfig(draft_dir)))
    try:
        assert "spec_draft" in engine.methods
        baseline = await generate(engine, "baseline")
        drafted = await generate(engine, "spec_draft")
        # the accel driver drafted with the configured model, and its calls carried the swarm token
        assert accel_chain_for(engine).draft_drafter is await engine.draft_drafters()
        assert drafted == baseline == reference_generate(tiny_model_path, list(PROMPT), NEW_TOKENS)
    finally:
        await engine.close()


async def test_spec_draft_is_offered_only_with_a_compatible_draft_model(
    tiny_model_path: Path, wrong_vocab: Path
) -> None:
    plain = ChainEngine(model_path=str(tiny_model_path), model_name="tiny", records=FixedRecords([]))
    assert "spec_draft" not in plain.methods and "spec_ngram" in plain.methods
    with pytest.raises(DraftModelError, match="vocab_size"):
        ChainEngine(model_path=str(tiny_model_path), model_name="tiny", records=FixedRecords([]),
                    config=ChainConfig(draft_model=DraftModelConfig(wrong_vocab)))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--blocks", "0:4", "--draft-model", "/nonexistent/draft"), "--draft-model /nonexistent/draft: no such"),
        (("--blocks", "0:4", "--draft-model", "WRONG"), "must share the served model's tokenizer"),
        (("--draft-model", "DRAFT"), "--draft-model is for the block chain driver"),
    ],
)
def test_dinet_node_run_refuses_a_bad_draft_model_at_start(
    tiny_model_path: Path, draft_dir: Path, wrong_vocab: Path, capsys: pytest.CaptureFixture[str],
    extra: tuple[str, ...], message: str,
) -> None:
    args = [{"DRAFT": str(draft_dir), "WRONG": str(wrong_vocab)}.get(a, a) for a in extra]
    assert main(["run", "--model", str(tiny_model_path), "--group", "g", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and err.startswith("dinet-node run: error:")


def test_the_draft_model_and_its_format_reach_the_driver_config(tiny_model_path: Path, draft_dir: Path) -> None:
    args = build_parser().parse_args(["run", "--model", str(tiny_model_path), "--group", "g", "--blocks", "0:4",
                                      "--draft-model", str(draft_dir), "--draft-weight-format", "int8"])
    assert _node_config(args).draft == DraftModelConfig(draft_dir, weight_format="int8")
    with pytest.raises(SystemExit):  # argparse: not one of the formats draft models load in
        build_parser().parse_args(["run", "--model", str(tiny_model_path), "--group", "g",
                                   "--draft-model", str(draft_dir), "--draft-weight-format", "fp8"])
    with pytest.raises(ValueError, match="weight format"):
        NodeConfig(model=str(tiny_model_path), model_name="tiny", group="g", blocks=(0, 4),
                   draft_model=str(draft_dir), draft_weight_format="fp8")
