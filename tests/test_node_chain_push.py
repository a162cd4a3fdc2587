"""Push mode over real node processes and the real DHT: hops hand each step to the next hop
themselves (driver -> s1 -> s2 -> s3 -> driver), and the output is what transformers gives.

Four block servers of the tiny model: 0:1, 1:3, a replica of 1:3, and 3:4, so every route
has three hops and the middle one can be killed. The tests share the swarm and run in
order: the last one kills a node.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from node.blocks.chain_engine import ChainConfig, ChainEngine, ChainSession
from node.blocks.dht import SwarmDHT
from node.engine import GenerationRequest
from tests.helpers_node import ServerProcess, reference_generate, start_servers

PROMPT = (9, 250, 31, 77, 4, 120, 66, 18, 5)
NEW_TOKENS = 20


@pytest.fixture(scope="module")
def swarm(tiny_model_path: Path) -> Iterator[list[ServerProcess]]:
    servers = start_servers(tiny_model_path, ["0:1", "1:3", "1:3", "3:4"])
    yield servers
    for server in servers:
        server.kill()


@pytest.fixture(scope="module")
def reference(tiny_model_path: Path) -> list[int]:
    return reference_generate(tiny_model_path, list(PROMPT), NEW_TOKENS)


@pytest.fixture
async def dht(swarm: list[ServerProcess]) -> AsyncIterator[SwarmDHT]:
    client = await asyncio.to_thread(SwarmDHT.start, initial_peers=swarm[0].maddrs, client_mode=True)
    yield client
    await asyncio.to_thread(client.shutdown)


def make_engine(model: Path, dht: SwarmDHT, *, push: bool) -> ChainEngine:
    return ChainEngine(model_path=str(model), model_name="tiny", records=dht,
                       config=ChainConfig(step_timeout_s=20.0, records_max_age_s=0.0, push=push))


async def generate(engine: ChainEngine, on_token=None) -> tuple[list[int], ChainSession]:
    """Greedy tokens, and the session that produced them (``on_token(tokens, session)`` after each)."""
    tokens: list[int] = []
    session: ChainSession | None = None
    async for token in engine.generate(GenerationRequest(prompt_ids=PROMPT, max_new_tokens=NEW_TOKENS)):
        tokens.append(token)
        if session is None:
            (session,) = engine.sessions
        if on_token is not None:
            on_token(tokens, session)
    assert session is not None
    return tokens, session


async def test_pushed_steps_give_the_tokens_of_transformers(
    tiny_model_path: Path, dht: SwarmDHT, reference: list[int]
) -> None:
    engine = make_engine(tiny_model_path, dht, push=True)
    try:
        tokens, session = await generate(engine)
    finally:
        await engine.close()
    assert tokens == reference
    assert [(h.start, h.end) for h in session.hops] == [(0, 1), (1, 3), (3, 4)]
    decode_steps = NEW_TOKENS - 1
    # prefill: the driver opens every hop itself; then each token goes to the first hop only and is pushed on
    assert session.carried == 3 + decode_steps
    assert session.pushed == 2 * decode_steps


async def test_star_mode_is_kept_as_a_fallback(tiny_model_path: Path, dht: SwarmDHT, reference: list[int]) -> None:
    engine = make_engine(tiny_model_path, dht, push=False)
    try:
        tokens, session = await generate(engine)
    finally:
        await engine.close()
    assert tokens == reference
    assert session.pushed == 0 and session.carried == 3 * NEW_TOKENS


async def test_sigkill_of_the_middle_hop_while_pushing_keeps_the_tokens(
    tiny_model_path: Path, dht: SwarmDHT, swarm: list[ServerProcess], reference: list[int]
) -> None:
    by_peer = {server.peer_id: server for server in swarm}
    killed: list[ServerProcess] = []
    pushed_at_kill: list[int] = []

    def kill_middle(tokens: list[int], session: ChainSession) -> None:
        if len(tokens) == 7:
            victim = by_peer[session.hops[1].peer_id]  # the 1:3 replica this request pushes through
            victim.kill()
            killed.append(victim)
            pushed_at_kill.append(session.pushed)

    engine = make_engine(tiny_model_path, dht, push=True)
    try:
        tokens, session = await generate(engine, kill_middle)
    finally:
        await engine.close()
    assert tokens == reference
    assert session.replacements == 1
    assert session.hops[1].peer_id != killed[0].peer_id and (session.hops[1].start, session.hops[1].end) == (1, 3)
    # pushing resumed through the replacement: most of the remaining steps were pushed again
    remaining = NEW_TOKENS - 7
    assert session.pushed - pushed_at_kill[0] >= 2 * (remaining - 2)
