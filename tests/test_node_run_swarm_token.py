"""`dinet-node run --blocks --swarm-token` (plain or `--accelerated` server): the node's block server refuses callers
without the token and serves those with it; the token never appears in its log; flags that cannot honour a token are
refused at start."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path

import grpc
import pytest

from node.__main__ import main
from node.blocks.auth import SWARM_TOKEN_ENV, call_metadata
from node.blocks.chain_engine import ChainConfig, ChainEngine
from node.engine import GenerationRequest
from proto import blocks_pb2, blocks_pb2_grpc
from proto.errors import NoRouteError
from proto.records import BlockRecord
from proto.topology import Topology
from tests.helpers_node import FixedRecords, read_until, reference_generate

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "run-swarm-Secret_42"
PROMPT = (5, 17, 200, 33, 99)


@pytest.mark.parametrize("server", ["plain", "accelerated"])
async def test_a_private_node_refuses_drivers_without_the_token_and_serves_members(
    amqp_url: str, topology: Topology, tiny_model_path: Path, tmp_path: Path, server: str
) -> None:
    accelerated = ("--accelerated",) if server == "accelerated" else ()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "node", "run", "--model", str(tiny_model_path), "--model-name", "tiny",
        "--group", "private", "--namespace", topology.namespace, "--state-dir", str(tmp_path), "--threads", "1",
        "--telemetry-lookback-s", "0", "--blocks", "0:4", "--swarm-token", TOKEN, *accelerated,
        cwd=ROOT, env={**os.environ, "DINET_AMQP_URL": amqp_url, "PYTHONPATH": str(ROOT)},
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, start_new_session=True,
    )
    assert proc.stderr is not None
    lines: list[str] = []
    try:
        address = (await asyncio.wait_for(
            read_until(proc.stderr, lines, re.compile(r"serving blocks \(0, 4\) at (\S+);")), 120))[1]
        await asyncio.wait_for(read_until(proc.stderr, lines, re.compile("ready: model")), 120)
        async with grpc.aio.insecure_channel(address) as channel:
            stub = blocks_pb2_grpc.BlockServiceStub(channel)
            for metadata in ((), call_metadata("not-the-token")):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.Info(blocks_pb2.InfoRequest(), metadata=metadata)
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        records = FixedRecords([BlockRecord(peer_id="node", address=address, group="private", start_block=0,
                                            end_block=4, throughput_tok_s=100.0)])
        request = GenerationRequest(prompt_ids=PROMPT, max_new_tokens=8)
        stranger = ChainEngine(model_path=str(tiny_model_path), model_name="tiny", records=records,
                               config=ChainConfig(swarm_token="", route_attempts=1))
        member = ChainEngine(model_path=str(tiny_model_path), model_name="tiny", records=records,
                             config=ChainConfig(swarm_token=TOKEN))
        try:
            with pytest.raises(NoRouteError):  # its probe is refused (UNAUTHENTICATED): the node is not usable
                [t async for t in stranger.generate(request)]
            assert [t async for t in member.generate(request)] == reference_generate(tiny_model_path, list(PROMPT), 8)
        finally:
            await stranger.close()
            await member.close()
    finally:
        if proc.returncode is None:
            proc.terminate()
        _, rest = await asyncio.wait_for(proc.communicate(), 60)
        lines += rest.decode(errors="replace").splitlines()
    assert proc.returncode == 0
    assert not any(TOKEN in line for line in lines)  # the token is never logged


@pytest.mark.parametrize(
    ("extra", "env_token", "message"),
    [
        (("--blocks", "0:4", "--swarm-token", "has space"), "", "printable ASCII"),
        (("--swarm-token", TOKEN), "", "--swarm-token protects the block swarm; it needs --blocks"),
    ],
)
def test_dinet_node_run_refuses_a_token_it_cannot_honour(
    tiny_model_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    extra: tuple[str, ...], env_token: str, message: str,
) -> None:
    monkeypatch.setenv(SWARM_TOKEN_ENV, env_token)
    assert main(["run", "--model", str(tiny_model_path), "--group", "g", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert TOKEN not in err and "has space" not in err
