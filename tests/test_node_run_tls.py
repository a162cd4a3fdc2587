"""`dinet-node run --blocks --tls-*` (plain or `--accelerated` server) as a real process: it serves only TLS, members
with a certificate from the swarm CA drive it to the reference tokens, plaintext callers fail; flags it cannot honour
are refused at start with one line."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path

import grpc
import pytest

from node.__main__ import main
from node.blocks.chain_engine import ChainConfig, ChainEngine
from node.blocks.tls import TLS_ENV
from node.engine import GenerationRequest
from proto import blocks_pb2, blocks_pb2_grpc
from proto.records import BlockRecord
from proto.topology import Topology
from tests.helpers_node import ROOT, FixedRecords, read_until, reference_generate
from tests.helpers_tls import make_ca, make_node, node_tls

PROMPT = (5, 17, 200, 33, 99)


@pytest.mark.parametrize("server", ["plain", "accelerated"])
async def test_a_tls_node_serves_members_only_over_tls(
    amqp_url: str, topology: Topology, tiny_model_path: Path, tmp_path: Path, server: str
) -> None:
    ca = make_ca(tmp_path)
    cert, key = make_node(ca, tmp_path, "node")
    accelerated = ("--accelerated",) if server == "accelerated" else ()
    env = {k: v for k, v in os.environ.items() if k not in TLS_ENV.values()}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "node", "run", "--model", str(tiny_model_path), "--model-name", "tiny",
        "--group", "tls", "--namespace", topology.namespace, "--state-dir", str(tmp_path / "state"), "--threads", "1",
        "--telemetry-lookback-s", "0", "--blocks", "0:4", "--tls-cert", str(cert), "--tls-key", str(key),
        "--tls-ca", str(ca.cert_file), *accelerated,
        cwd=ROOT, env={**env, "DINET_AMQP_URL": amqp_url, "PYTHONPATH": str(ROOT)},
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, start_new_session=True,
    )
    assert proc.stderr is not None
    lines: list[str] = []
    try:
        address = (await asyncio.wait_for(
            read_until(proc.stderr, lines, re.compile(r"serving blocks \(0, 4\) at (\S+);")), 120))[1]
        await asyncio.wait_for(read_until(proc.stderr, lines, re.compile("ready: model")), 120)
        async with grpc.aio.insecure_channel(address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await blocks_pb2_grpc.BlockServiceStub(channel).Info(blocks_pb2.InfoRequest(), timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        records = FixedRecords([BlockRecord(peer_id="node", address=address, group="tls", start_block=0,
                                            end_block=4, throughput_tok_s=100.0, tls=True)])
        member = ChainEngine(model_path=str(tiny_model_path), model_name="tiny", records=records,
                             config=ChainConfig(swarm_token="", tls=node_tls(ca, tmp_path, "driver")))
        try:
            request = GenerationRequest(prompt_ids=PROMPT, max_new_tokens=8)
            assert [t async for t in member.generate(request)] == reference_generate(tiny_model_path, list(PROMPT), 8)
        finally:
            await member.close()
    finally:
        if proc.returncode is None:
            proc.terminate()
        _, rest = await asyncio.wait_for(proc.communicate(), 60)
        lines += rest.decode(errors="replace").splitlines()
    assert proc.returncode == 0, "\n".join(lines[-30:])


def test_dinet_node_run_refuses_tls_it_cannot_honour(
    tiny_model_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in TLS_ENV.values():
        monkeypatch.delenv(var, raising=False)
    ca = make_ca(tmp_path)
    cert, key = make_node(ca, tmp_path, "node")
    full = ("--tls-cert", str(cert), "--tls-key", str(key), "--tls-ca", str(ca.cert_file))
    for extra, message in [
        (("--blocks", "0:4", "--tls-cert", str(cert)), "missing --tls-key, --tls-ca"),
        (("--blocks", "0:4", "--tls-cert", str(cert), "--tls-key", str(key), "--tls-ca", str(cert)),
         "not signed by the swarm CA"),
        (full, "they need --blocks or --initial-peers"),
    ]:
        assert main(["run", "--model", str(tiny_model_path), "--group", "g", *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
