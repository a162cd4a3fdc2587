"""A model no single node holds: three block servers (blocks 0:N/2, N/2:N and a replica of
N/2:N) as separate processes, found through the real hivemind DHT, driven by ChainEngine.

The tests in this module share the swarm and run in order: the last one kills nodes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import torch

from node.blocks.chain_engine import ChainConfig, ChainEngine
from node.blocks.dht import SwarmDHT
from node.blocks.swarm import add_swarm_parser
from node.engine import GenerationRequest
from proto.errors import NoRouteError
from tests.helpers_node import ServerProcess, reference_generate, start_servers

PROMPT = (5, 17, 200, 33, 99, 12, 7, 8, 41, 3)
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def swarm(tiny_model_path: Path) -> Iterator[list[ServerProcess]]:
    servers = start_servers(tiny_model_path, ["0:2", "2:4", "2:4"])
    yield servers
    for server in servers:
        server.kill()


@pytest.fixture(scope="module")
def reference(tiny_model_path: Path) -> list[int]:
    return reference_generate(tiny_model_path, list(PROMPT), NEW_TOKENS)


@pytest.fixture
async def engine(
    request: pytest.FixtureRequest, tiny_model_path: Path, swarm: list[ServerProcess]
) -> AsyncIterator[ChainEngine]:
    """A driver with its own DHT client; ``@pytest.mark.parametrize("engine", [seconds], indirect=True)``
    sets its step timeout (default 20 s: generous for a loaded CI machine)."""
    dht = await asyncio.to_thread(SwarmDHT.start, initial_peers=swarm[0].maddrs, client_mode=True)
    timeout = float(getattr(request, "param", 20.0))
    engine = ChainEngine(model_path=str(tiny_model_path), model_name="tiny", records=dht,
                         config=ChainConfig(step_timeout_s=timeout, records_max_age_s=0.0))
    yield engine
    await engine.close()
    await asyncio.to_thread(dht.shutdown)


async def collect(engine: ChainEngine, request: GenerationRequest) -> list[int]:
    return [token async for token in engine.generate(request)]


async def test_chain_matches_transformers_generate(engine: ChainEngine, reference: list[int]) -> None:
    tokens = await collect(engine, GenerationRequest(prompt_ids=PROMPT, max_new_tokens=NEW_TOKENS))
    assert tokens == reference


async def test_final_hidden_states_match_the_whole_model(engine: ChainEngine, tiny_model_path: Path) -> None:
    from transformers import LlamaForCausalLM

    session = await engine.open_session(max_length=len(PROMPT))
    try:
        assert [(h.start, h.end) for h in session.hops] == [(0, 2), (2, 4)]
        hidden = await session.step(engine.driver.embed_ids(torch.tensor([PROMPT])))
    finally:
        await session.close()
    model = LlamaForCausalLM.from_pretrained(tiny_model_path).eval()
    with torch.no_grad():
        expected = model.model(torch.tensor([PROMPT])).last_hidden_state
    assert (engine.driver.norm(hidden) - expected).abs().max().item() < 1e-4


def test_swarm_command_prints_nodes_and_coverage(swarm: list[ServerProcess], capsys) -> None:
    parser = argparse.ArgumentParser()
    add_swarm_parser(parser.add_subparsers())
    args = parser.parse_args(["swarm", "--initial-peers", *swarm[0].maddrs, "--json"])
    assert args.func(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert {n["peer_id"] for n in summary["nodes"]} == {s.peer_id for s in swarm}
    assert summary["models"]["tiny"]["servers_per_block"] == [1, 1, 2, 2]
    assert summary["models"]["tiny"]["gaps"] == [] and summary["models"]["tiny"]["complete"]


@pytest.mark.parametrize("engine", [3.0], indirect=True)
async def test_frozen_replica_times_out_and_its_span_moves(
    engine: ChainEngine, swarm: list[ServerProcess], reference: list[int]
) -> None:
    by_peer = {server.peer_id: server for server in swarm}
    tokens: list[int] = []
    frozen: ServerProcess | None = None
    try:
        async for token in engine.generate(GenerationRequest(prompt_ids=PROMPT, max_new_tokens=NEW_TOKENS)):
            tokens.append(token)
            if len(tokens) == 6:
                (session,) = engine.sessions
                frozen = by_peer[session.hops[-1].peer_id]
                frozen.proc.send_signal(signal.SIGSTOP)  # alive, connected, silent: only the step timeout sees it
    finally:
        if frozen is not None:
            frozen.proc.send_signal(signal.SIGCONT)
    assert tokens == reference
    assert frozen is not None and session.replacements == 1 and session.hops[-1].peer_id != frozen.peer_id


async def test_sigkill_of_serving_replica_mid_generation_then_no_route(
    engine: ChainEngine, swarm: list[ServerProcess], reference: list[int]
) -> None:
    by_peer = {server.peer_id: server for server in swarm}
    tokens: list[int] = []
    killed: ServerProcess | None = None
    async for token in engine.generate(GenerationRequest(prompt_ids=PROMPT, max_new_tokens=NEW_TOKENS)):
        tokens.append(token)
        if len(tokens) == 8:
            (session,) = engine.sessions
            killed = by_peer[session.hops[-1].peer_id]  # the replica serving 2:4 for this request
            killed.kill()
    assert tokens == reference
    assert killed is not None and session.replacements == 1
    assert session.hops[-1].peer_id != killed.peer_id

    # the surviving replica stops cleanly: it withdraws its records, and nothing serves 2:4 any more
    survivor = next(s for s in swarm[1:] if s is not killed)
    survivor.stop()
    with pytest.raises(NoRouteError) as info:
        await collect(engine, GenerationRequest(prompt_ids=PROMPT, max_new_tokens=2))
    assert info.value.missing_blocks == [2, 3]

    # the killed node could not withdraw: its records leave the DHT within one record TTL (6 s)
    dht = engine.records
    assert isinstance(dht, SwarmDHT)
    for _ in range(40):
        peers = {r.peer_id for r in await dht.block_records("tiny", 4)}
        if peers == {swarm[0].peer_id}:
            break
        await asyncio.sleep(0.25)
    assert peers == {swarm[0].peer_id}
