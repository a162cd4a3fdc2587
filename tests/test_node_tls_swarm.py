"""TLS nodes as real processes (``python -m node.blocks.serve_main --tls-*``) in a real DHT next to a plaintext one:
their records say they speak TLS, a TLS driver routes (and hops push) only through them with the reference tokens,
and a plaintext driver finds no route over the TLS-only span instead of failing a hop."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from node.blocks.chain_engine import ChainConfig, ChainEngine
from node.blocks.dht import SwarmDHT
from node.blocks.tls import TlsConfig
from node.engine import GenerationRequest
from proto.errors import NoRouteError
from tests.helpers_node import ROOT, ServerProcess, reference_generate, spawn_server, wait_ready
from tests.helpers_tls import make_ca, make_node, node_tls

PROMPT = (9, 250, 31, 77, 4)
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(directory, CA file) of a swarm CA with certificates node0.pem/.key and node2.pem/.key."""
    directory = tmp_path_factory.mktemp("tls-swarm")
    ca = make_ca(directory)
    for node in ("node0", "node2", "driver"):
        make_node(ca, directory, node)
    return directory, ca.cert_file


def _tls_flags(directory: Path, ca: Path, node: str) -> list[str]:
    return ["--tls-cert", str(directory / f"{node}.pem"), "--tls-key", str(directory / f"{node}.key"),
            "--tls-ca", str(ca)]


@pytest.fixture(scope="module")
def swarm(tiny_model_path: Path, certs: tuple[Path, Path]) -> Iterator[list[ServerProcess]]:
    """TLS 0:2 and 2:4, and a plaintext 2:4 the TLS driver must leave out."""
    directory, ca = certs
    first = wait_ready(spawn_server(tiny_model_path, "0:2", extra=_tls_flags(directory, ca, "node0")))
    rest = [spawn_server(tiny_model_path, "2:4", initial_peers=first.maddrs, extra=_tls_flags(directory, ca, "node2")),
            spawn_server(tiny_model_path, "2:4", initial_peers=first.maddrs)]
    servers = [first, *(wait_ready(s) for s in rest)]
    yield servers
    for server in servers:
        server.stop()


@pytest.fixture
async def dht(swarm: list[ServerProcess]) -> AsyncIterator[SwarmDHT]:
    client = await asyncio.to_thread(SwarmDHT.start, initial_peers=swarm[0].maddrs, client_mode=True)
    yield client
    await asyncio.to_thread(client.shutdown)


async def test_tls_driver_routes_and_pushes_through_tls_nodes_only(
    tiny_model_path: Path, certs: tuple[Path, Path], swarm: list[ServerProcess], dht: SwarmDHT
) -> None:
    directory, ca = certs
    tls = TlsConfig(directory / "driver.pem", directory / "driver.key", ca)
    records = await dht.block_records("tiny", 4)
    assert sorted((r.start_block, r.tls) for r in records) == [(0, True), (2, False), (2, True)]
    member = ChainEngine(model_path=str(tiny_model_path), model_name="tiny", records=dht,
                         config=ChainConfig(swarm_token="", tls=tls, push=True, step_timeout_s=20.0))
    plaintext = ChainEngine(model_path=str(tiny_model_path), model_name="tiny", records=dht,
                            config=ChainConfig(swarm_token="", route_attempts=1))
    try:
        tokens, pushed, hops = [], 0, []
        async for token in member.generate(GenerationRequest(prompt_ids=PROMPT, max_new_tokens=NEW_TOKENS)):
            tokens.append(token)
            (session,) = member.sessions
            pushed, hops = max(pushed, session.pushed), [h.peer_id for h in session.hops]
        assert tokens == reference_generate(tiny_model_path, list(PROMPT), NEW_TOKENS)
        assert hops == [swarm[0].peer_id, swarm[1].peer_id]  # never the plaintext replica of 2:4
        assert pushed > 0  # node0 pushed to node2 over TLS, allowed by its DHT view of TLS peers
        with pytest.raises(NoRouteError) as missing:  # 0:2 is TLS-only: no plaintext route, no failed hop
            await plaintext.route(0, 4)
        assert 0 in missing.value.missing_blocks
    finally:
        await member.close()
        await plaintext.close()


def test_a_tls_node_cannot_start_with_a_certificate_of_another_swarm(
    tiny_model_path: Path, certs: tuple[Path, Path], tmp_path: Path
) -> None:
    directory, _ = certs
    other = make_ca(tmp_path, "other")
    node = node_tls(other, tmp_path, "stray")
    done = subprocess.run(
        [sys.executable, "-m", "node.blocks.serve_main", "--model", str(tiny_model_path), "--blocks", "0:2",
         "--tls-cert", str(node.cert_file), "--tls-key", str(node.key_file),
         "--tls-ca", str(directory / "swarm-ca.pem")],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2
    assert "is not signed by the swarm CA in --tls-ca" in done.stderr


def test_drive_main_with_tls_flags_drives_the_tls_nodes(
    tiny_model_path: Path, certs: tuple[Path, Path], swarm: list[ServerProcess]
) -> None:
    directory, ca = certs
    done = subprocess.run(
        [sys.executable, "-m", "node.blocks.drive_main", "--model", str(tiny_model_path), "--name", "tiny",
         "--initial-peers", *swarm[0].maddrs, "--prompt-ids", ",".join(map(str, PROMPT)),
         "--max-new-tokens", str(NEW_TOKENS), *_tls_flags(directory, ca, "driver")],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["tokens"] == reference_generate(tiny_model_path, list(PROMPT), NEW_TOKENS)
    assert [hop.split("/")[1] for hop in result["hops"]] == ["0:2", "2:4"]
    assert result["hops"][1].split("/")[0] == swarm[1].info["address"]  # the TLS replica of 2:4
