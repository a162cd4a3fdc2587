"""TLS with the swarm's private CA on every block-serving channel: real gRPC servers on loopback, certificates
made here. Members chain (star, push, accelerated) with the same greedy tokens; anyone else fails fast and typed."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from node.accel.chain import AccelChain, Hop, HopError
from node.accel.executor import ModelHead
from node.accel.server import AccelBlockServer, AccelServerConfig
from node.blocks.block_functions import BlockSpan
from node.blocks.chain_engine import ChainConfig, ChainEngine
from node.blocks.kv_cache import CacheManager
from node.blocks.loader import load_blocks, load_config
from node.blocks.push import PushChannels, StaticPushPolicy
from node.blocks.server import BlockServicer, ServerLimits, grpc_options, start_grpc_server
from node.blocks.tls import TlsConfig, open_channel
from node.engine import GenerationRequest
from proto import blocks_pb2, blocks_pb2_grpc
from proto.errors import NoRouteError
from proto.records import BlockRecord
from tests.helpers_node import FixedRecords, reference_generate
from tests.helpers_tls import Ca, make_ca, node_tls

PROMPT = (5, 17, 200, 33, 99)
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def swarm_ca(tmp_path_factory: pytest.TempPathFactory) -> Ca:
    return make_ca(tmp_path_factory.mktemp("swarm-ca"))


@pytest.fixture(scope="module")
def reference(tiny_model_path: Path) -> list[int]:
    return reference_generate(tiny_model_path, list(PROMPT), NEW_TOKENS)


async def _block_server(model: Path, start: int, end: int, tls: TlsConfig | None) -> tuple[grpc.aio.Server,
                                                                                          BlockServicer, str]:
    config = load_config(model)
    span = BlockSpan.create(config, load_blocks(model, config, start, end), start)
    servicer = BlockServicer(span=span, model_name="tiny", caches=CacheManager(budget_bytes=1 << 24, ttl_s=60),
                             limits=ServerLimits(), push_channels=PushChannels(grpc_options(1 << 20), tls=tls))
    server, port = await start_grpc_server(servicer, "127.0.0.1", 0, tls=tls)
    return server, servicer, f"127.0.0.1:{port}"


@pytest.fixture
async def tls_swarm(tiny_model_path: Path, swarm_ca: Ca, tmp_path: Path) -> AsyncIterator[list[BlockRecord]]:
    """Blocks 0:2 and 2:4 on two TLS-only servers, each with its own certificate; the first pushes to the second."""
    started, records = [], []
    for start, end in ((0, 2), (2, 4)):
        server, servicer, address = await _block_server(tiny_model_path, start, end,
                                                        node_tls(swarm_ca, tmp_path, f"node{start}"))
        started.append((server, servicer))
        records.append(BlockRecord(peer_id=f"p{start}", address=address, group="g", start_block=start, end_block=end,
                                   throughput_tok_s=100.0, tls=True))
    started[0][1].push_policy = StaticPushPolicy([records[1].address])
    yield records
    for server, servicer in started:
        await server.stop(grace=None)
        await servicer.aclose()


def _engine(model: Path, records: list[BlockRecord], tls: TlsConfig | None, **chain: object) -> ChainEngine:
    return ChainEngine(model_path=str(model), model_name="tiny", records=FixedRecords(records),
                       config=ChainConfig(swarm_token="", tls=tls, route_attempts=1, **chain))  # type: ignore[arg-type]


@pytest.mark.parametrize("push", [False, True])
async def test_members_chain_over_tls_with_the_plaintext_greedy_tokens(
    tiny_model_path: Path, swarm_ca: Ca, tmp_path: Path, tls_swarm: list[BlockRecord], reference: list[int],
    push: bool,
) -> None:
    member = _engine(tiny_model_path, tls_swarm, node_tls(swarm_ca, tmp_path, "driver"), push=push)
    try:
        tokens, pushed = [], 0
        async for token in member.generate(GenerationRequest(prompt_ids=PROMPT, max_new_tokens=NEW_TOKENS)):
            tokens.append(token)
            pushed = max(pushed, *(s.pushed for s in member.sessions))
        assert tokens == reference
        assert (pushed > 0) == push  # hop -> hop pushes went over TLS between the two servers
    finally:
        await member.close()


async def test_strangers_cannot_step_a_tls_chain_and_fail_fast(
    tiny_model_path: Path, swarm_ca: Ca, tmp_path: Path, tls_swarm: list[BlockRecord]
) -> None:
    other = make_ca(tmp_path / "other", "other")
    # trusts another CA (so rejects the servers), or trusts ours but shows a certificate the servers reject
    impostor = node_tls(other, tmp_path / "other", "impostor")
    # the second trusts the swarm CA but holds a certificate from another CA: the server side of mutual TLS refuses
    # it (TlsConfig itself refuses that combination, so it is built unchecked)
    for stranger in (impostor, _unchecked(impostor.cert_file, impostor.key_file, swarm_ca.cert_file)):
        engine = _engine(tiny_model_path, tls_swarm, stranger)
        begin = time.monotonic()
        try:
            with pytest.raises(NoRouteError):  # its probes fail the handshake: no peer is usable
                [t async for t in engine.generate(GenerationRequest(prompt_ids=PROMPT, max_new_tokens=2))]
        finally:
            await engine.close()
        assert time.monotonic() - begin < 15.0
    plaintext = _engine(tiny_model_path, tls_swarm, None)  # skips TLS peers outright (records say tls)
    try:
        with pytest.raises(NoRouteError):
            await plaintext.route(0, 4)
    finally:
        await plaintext.close()


def _unchecked(cert: Path, key: Path, ca: Path) -> TlsConfig:
    """A TlsConfig whose certificate is not from its CA (the constructor refuses that; peers must too)."""
    config = object.__new__(TlsConfig)
    for name, value in (("cert_file", cert), ("key_file", key), ("ca_file", ca), ("server_name", "dinet-swarm"),
                        ("cert_pem", cert.read_bytes()), ("key_pem", key.read_bytes()), ("ca_pem", ca.read_bytes())):
        object.__setattr__(config, name, value)
    return config


async def test_plaintext_and_tls_do_not_mix(
    tiny_model_path: Path, swarm_ca: Ca, tmp_path: Path, tls_swarm: list[BlockRecord]
) -> None:
    member = node_tls(swarm_ca, tmp_path, "client")
    async with grpc.aio.insecure_channel(tls_swarm[0].address) as channel:  # plaintext client, TLS server
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await blocks_pb2_grpc.BlockServiceStub(channel).Info(blocks_pb2.InfoRequest(), timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    server, servicer, address = await _block_server(tiny_model_path, 0, 2, None)
    try:
        async with open_channel(address, grpc_options(1 << 20), member) as channel:  # TLS client, plaintext server
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await blocks_pb2_grpc.BlockServiceStub(channel).Info(blocks_pb2.InfoRequest(), timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        async with open_channel(tls_swarm[0].address, grpc_options(1 << 20), member) as channel:  # a member: served
            info = await blocks_pb2_grpc.BlockServiceStub(channel).Info(blocks_pb2.InfoRequest(), timeout=10)
            assert (info.start_block, info.end_block) == (0, 2)
    finally:
        await server.stop(grace=None)
        await servicer.aclose()


async def test_an_accelerated_chain_over_tls_matches_the_reference(
    tiny_model_path: Path, swarm_ca: Ca, tmp_path: Path, reference: list[int]
) -> None:
    servers = []
    try:
        for start, end in ((0, 2), (2, 4)):
            servers.append(await AccelBlockServer.create(AccelServerConfig(
                model_path=tiny_model_path, model_name="tiny", start=start, end=end,
                tls=node_tls(swarm_ca, tmp_path, f"accel{start}"))))
        hops = [Hop(s.address, s.config.start, s.config.end) for s in servers]
        request = GenerationRequest(prompt_ids=PROMPT, max_new_tokens=NEW_TOKENS, method="continuous_batching")
        member = AccelChain(model_name="tiny", head=ModelHead.load(tiny_model_path), hops=hops,
                            tls=node_tls(swarm_ca, tmp_path, "accel-driver"))
        plaintext = AccelChain(model_name="tiny", head=ModelHead.load(tiny_model_path), hops=hops, max_restarts=0,
                               step_timeout_s=10.0)
        try:
            assert [t async for t in member.generate(request)] == reference
            with pytest.raises(HopError):
                [t async for t in plaintext.generate(request)]
        finally:
            await member.close()
            await plaintext.close()
    finally:
        for server in servers:
            await server.close(grace=0.1)
