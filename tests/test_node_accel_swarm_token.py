"""A private swarm of accelerated servers: an ``AccelChain`` that opens its own channels (no ``stub_for``) carries
the swarm token like every other driver, and one without the right token fails at once with ``SwarmTokenError``;
``python -m node.accel.serve`` refuses calls without its token and rejects token flags it cannot honour."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import pytest

from node.accel.chain import AccelChain, Hop, SwarmTokenError
from node.accel.executor import ModelHead
from node.accel.serve import main as accel_serve_main
from node.accel.server import AccelBlockServer, AccelServerConfig
from node.blocks.auth import SWARM_TOKEN_ENV, call_metadata, swarm_token_from_env
from node.blocks.drive_main import main as drive_main
from node.blocks.serve_main import main as serve_main
from node.engine import GenerationRequest
from proto import blocks_pb2, blocks_pb2_grpc
from tests.helpers_accel import reference_greedy

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "accel-Swarm_token-7"
PROMPT = tuple(range(40, 80))  # 40 tokens: prefix_caching sends hashes (32-token blocks) and asks for a hit
NEW_TOKENS = 8
# one per way a driver talks to a hop: a session stream, a batched stream (InferenceBatch), a prefix question first
METHODS = ["baseline", "continuous_batching", "prefix_caching"]


@pytest.fixture(scope="module")
def expected(tiny_model_path: Path) -> list[int]:
    return reference_greedy(tiny_model_path, [PROMPT], NEW_TOKENS)[0]


@pytest.fixture
async def private_hops(tiny_model_path: Path) -> AsyncIterator[list[Hop]]:
    """Blocks 0:2 and 2:4 on two accelerated servers that demand TOKEN."""
    servers = []
    try:
        for start, end in ((0, 2), (2, 4)):
            servers.append(await AccelBlockServer.create(AccelServerConfig(
                model_path=tiny_model_path, model_name="tiny", start=start, end=end, swarm_token=TOKEN)))
        yield [Hop(s.address, s.config.start, s.config.end) for s in servers]
    finally:
        for server in servers:
            await server.close(grace=0.1)


def driver(model: Path, hops: list[Hop], token: str | None, **kwargs: object) -> AccelChain:
    return AccelChain(model_name="tiny", head=ModelHead.load(model), hops=hops, swarm_token=token,
                      **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("method", METHODS)
async def test_a_driver_with_its_own_channels_carries_the_token(
    tiny_model_path: Path, private_hops: list[Hop], expected: list[int], method: str
) -> None:
    member = driver(tiny_model_path, private_hops, TOKEN)
    try:
        request = GenerationRequest(prompt_ids=PROMPT, max_new_tokens=NEW_TOKENS, method=method)
        assert [t async for t in member.generate(request)] == expected
    finally:
        await member.close()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("token", ["", "not-the-token"])
async def test_a_driver_without_the_right_token_gets_a_swarm_token_error_at_once(
    tiny_model_path: Path, private_hops: list[Hop], method: str, token: str
) -> None:
    failed: list[Hop] = []

    async def on_failure(hop: Hop) -> None:
        failed.append(hop)

    stranger = AccelChain(model_name="tiny", head=ModelHead.load(tiny_model_path), route=_fixed(private_hops),
                          on_hop_failure=on_failure, swarm_token=token, max_restarts=3, step_timeout_s=20.0)
    began = time.monotonic()
    try:
        request = GenerationRequest(prompt_ids=PROMPT, max_new_tokens=NEW_TOKENS, method=method)
        with pytest.raises(SwarmTokenError) as refused:
            [t async for t in stranger.generate(request)]
    finally:
        await stranger.close()
    assert time.monotonic() - began < 10  # not retried route after route: no route can help
    assert not refused.value.retryable and "UNAUTHENTICATED" in str(refused.value)
    assert "swarm_token" in str(refused.value) and TOKEN not in str(refused.value)
    assert failed and failed[0] == private_hops[0]  # a routed driver is told, so it can leave the peer out


def _fixed(hops: list[Hop]) -> Callable[[], Awaitable[list[Hop]]]:
    async def route() -> list[Hop]:
        return hops

    return route


def test_the_driver_refuses_token_settings_it_cannot_use(tiny_model_path: Path) -> None:
    hops = [Hop("127.0.0.1:1", 0, 4)]
    with pytest.raises(ValueError, match="printable ASCII"):
        driver(tiny_model_path, hops, "has space")
    with pytest.raises(ValueError, match="with stub_for"):
        driver(tiny_model_path, hops, TOKEN, stub_for=lambda address: None)


def test_the_driver_token_defaults_to_the_environment(tiny_model_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SWARM_TOKEN_ENV, TOKEN)
    hops = [Hop("127.0.0.1:1", 0, 4)]
    assert driver(tiny_model_path, hops, None).access.metadata == call_metadata(TOKEN)
    assert driver(tiny_model_path, hops, "").access.metadata == ()  # explicit "" = open swarm, in code
    monkeypatch.setenv(SWARM_TOKEN_ENV, "")
    assert driver(tiny_model_path, hops, None).access.metadata == ()


async def test_accel_serve_process_refuses_calls_without_its_token(tiny_model_path: Path, expected: list[int]) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "node.accel.serve", "--model", str(tiny_model_path), "--model-name", "tiny",
        "--blocks", "0:4", "--threads", "1", cwd=ROOT, start_new_session=True,
        env={**os.environ, SWARM_TOKEN_ENV: TOKEN, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    try:
        ready = (await asyncio.wait_for(proc.stdout.readline(), 120)).decode()
        assert ready.startswith("READY "), ready
        address = ready.split()[1]
        async with grpc.aio.insecure_channel(address) as channel:
            stub = blocks_pb2_grpc.BlockServiceStub(channel)
            for metadata in ((), call_metadata("not-the-token")):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.Info(blocks_pb2.InfoRequest(), metadata=metadata, timeout=10)
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            info = await stub.Info(blocks_pb2.InfoRequest(), metadata=call_metadata(TOKEN), timeout=10)
            assert (info.start_block, info.end_block) == (0, 4)
        hops = [Hop(address, 0, 4)]
        member, stranger = driver(tiny_model_path, hops, TOKEN), driver(tiny_model_path, hops, "")
        try:
            request = GenerationRequest(prompt_ids=PROMPT, max_new_tokens=NEW_TOKENS, method="continuous_batching")
            assert [t async for t in member.generate(request)] == expected
            with pytest.raises(SwarmTokenError):
                [t async for t in stranger.generate(request)]
        finally:
            await member.close()
            await stranger.close()
    finally:
        if proc.returncode is None:
            proc.terminate()
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    assert TOKEN not in out.decode() + err.decode()  # the token is never printed


@pytest.mark.parametrize("entry", ["accel.serve", "blocks.serve_main", "blocks.drive_main"])
@pytest.mark.parametrize(("token", "message"), [("", "--swarm-token is empty"), ("has space", "printable ASCII")])
def test_every_cli_refuses_an_empty_or_malformed_token(
    tiny_model_path: Path, capsys: pytest.CaptureFixture[str], entry: str, token: str, message: str
) -> None:
    common = ["--model", str(tiny_model_path), "--swarm-token", token]
    argv = {"accel.serve": [*common, "--blocks", "0:2"], "blocks.serve_main": [*common, "--blocks", "0:2"],
            "blocks.drive_main": [*common, "--initial-peers", "/ip4/127.0.0.1/tcp/1", "--prompt-ids", "1,2"]}[entry]
    main = {"accel.serve": accel_serve_main, "blocks.serve_main": serve_main, "blocks.drive_main": drive_main}[entry]
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert "has space" not in err.splitlines()[-1]  # the error line never quotes the token


def test_an_empty_flag_is_an_error_but_an_empty_variable_means_open(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SWARM_TOKEN_ENV, "")
    assert swarm_token_from_env() == ""
    with pytest.raises(ValueError, match="--swarm-token is empty"):
        swarm_token_from_env("")
