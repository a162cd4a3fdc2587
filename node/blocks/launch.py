"""Start a block-serving node: DHT peer, selective weight load, gRPC server, announcer, driver.

:func:`start_serving` is what ``dinet-node run`` (node/engine_stack.py) and the test/bench entry
:mod:`node.blocks.serve_main` call; :class:`ServingHandle` is what they get back: the
address it serves on, the DHT multiaddrs others can join through, and a chain-driving
:class:`~node.blocks.chain_engine.ChainEngine` for the model, usable by the task worker.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import grpc

from node.blocks.auth import swarm_token_from_env
from node.blocks.block_functions import BlockSpan, measure_throughput
from node.blocks.chain_engine import ChainConfig, ChainEngine
from node.blocks.dht import Announcer, SwarmDHT
from node.blocks.kv_cache import CacheManager
from node.blocks.loader import WEIGHT_DTYPES, load_blocks, load_config, resolve_model_dir
from node.blocks.local_span import LocalBlocks
from node.blocks.push import NoPush, PushChannels, SwarmPushPolicy
from node.blocks.server import BlockServicer, ServerLimits, grpc_options, start_grpc_server
from node.blocks.tls import TlsConfig
from proto.records import BlockRecord, HardwareInfo, NodeRecord

if TYPE_CHECKING:
    from hivemind.utils.crypto import RSAPrivateKey

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServingConfig:
    """Everything a serving node is started with."""

    model_path: str  # local dir or hub name, loaded with from_pretrained-compatible code
    model_name: str  # name announced in the DHT (what requests ask for)
    group: str  # consumer group this node belongs to (announced in its records)
    start_block: int | None = None  # first served block; None/None = all blocks
    end_block: int | None = None  # one past the last served block
    host: str = "127.0.0.1"  # gRPC and DHT listen address
    port: int = 0  # gRPC port (0 = any free port)
    initial_peers: tuple[str, ...] = ()  # hivemind multiaddrs; empty = start a new swarm
    weight_format: str = "fp32"  # fp32 | bf16 | int8 (dynamic quantization of the linear layers)
    cache_bytes: int = 1 << 30  # KV-cache budget for all sessions together
    session_ttl_s: float = 300.0  # a session idle this long is dropped
    announce_period_s: float = 10.0  # DHT records are refreshed this often...
    record_ttl_s: float = 30.0  # ...and expire this long after each refresh
    announce_host: str | None = None  # address others reach this node at, when not ``host`` (NAT, 0.0.0.0)
    dht_port: int = 0  # DHT (libp2p) port (0 = any free port)
    limits: ServerLimits = field(default_factory=ServerLimits)  # per-peer bounds of the gRPC service
    push: bool = True  # push outputs to the next hop when a driver asks (to DHT-listed peers only)
    # this node's driver runs its own blocks in-process (node/blocks/local_span.py); False = over its own
    # gRPC server like any peer's (every hop of a chain on the wire, e.g. to measure it)
    local_blocks: bool = True
    # calls without this token are refused, and this node's own calls (pushes, driving) carry it
    # (node/blocks/auth.py); default $DINET_SWARM_TOKEN, "" = open swarm
    swarm_token: str = field(default_factory=swarm_token_from_env, repr=False)
    # TLS with the swarm's private CA (node/blocks/tls.py): the node serves only TLS, its pushes and its driver
    # use it too, and its records say so; None = plaintext (the default)
    tls: TlsConfig | None = None
    chain: ChainConfig = field(default_factory=ChainConfig)  # the driver's retry/routing knobs


class ServingHandle:
    """A running node; :meth:`close` stops everything it started, in reverse order."""

    def __init__(
        self,
        *,
        engine: ChainEngine,
        address: str,
        swarm: SwarmDHT,
        server: grpc.aio.Server,
        servicer: BlockServicer,
        announcer: Announcer,
        push_channels: PushChannels | None = None,
    ) -> None:
        self.engine = engine
        self.address = address
        self.swarm = swarm
        self.dht_maddrs = swarm.maddrs
        self.peer_id = swarm.peer_id
        self._server = server
        self._servicer = servicer
        self._announcer = announcer
        self._push_channels = push_channels

    async def close(self) -> None:
        await self._announcer.close(withdraw=True)
        await self.engine.close()
        await self._server.stop(grace=1.0)
        self._servicer.close()
        if self._push_channels is not None:
            await self._push_channels.close()
        await asyncio.to_thread(self.swarm.shutdown)


async def start_serving(
    config: ServingConfig, hardware: HardwareInfo, *, identity: RSAPrivateKey | None = None
) -> ServingHandle:
    """Join the DHT, load the configured blocks, serve them and announce them.

    ``identity``: the node's key, its DHT peer id derives from it (:meth:`SwarmDHT.start`).

    :raises ValueError: for a block range outside the model or an unknown weight format.
    """
    if config.weight_format not in WEIGHT_DTYPES:
        raise ValueError(f"unknown weight format {config.weight_format!r}; choose one of {sorted(WEIGHT_DTYPES)}")
    # the DHT forks a child process: start it before the weights make this process large
    swarm = await asyncio.to_thread(
        SwarmDHT.start, initial_peers=config.initial_peers, host=config.host, port=config.dht_port,
        announce_host=config.announce_host, identity=identity,
    )
    try:
        return await _serve(config, hardware, swarm)
    except BaseException:
        await asyncio.to_thread(swarm.shutdown)
        raise


def driver_config(config: ServingConfig) -> ChainConfig:
    """The node's own driver: the node's swarm token and TLS, unless its chain config sets its own."""
    chain = config.chain if config.chain.swarm_token else replace(config.chain, swarm_token=config.swarm_token)
    return chain if chain.tls is not None or config.tls is None else replace(chain, tls=config.tls)


async def swarm_peers(swarm: SwarmDHT, config: ServingConfig, model: str, num_blocks: int) -> list[BlockRecord]:
    """Live block records of peers this node can push to: those of its own TLS mode."""
    return [r for r in await swarm.block_records(model, num_blocks) if r.tls == (config.tls is not None)]


async def _serve(config: ServingConfig, hardware: HardwareInfo, swarm: SwarmDHT) -> ServingHandle:
    model_dir = await asyncio.to_thread(resolve_model_dir, config.model_path)
    model_config = load_config(model_dir)
    total = int(model_config.num_hidden_layers)
    start = 0 if config.start_block is None else config.start_block
    end = total if config.end_block is None else config.end_block
    layers = await asyncio.to_thread(load_blocks, model_dir, model_config, start, end,
                                     weight_format=config.weight_format)
    dtype = WEIGHT_DTYPES[config.weight_format]
    span = BlockSpan.create(model_config, layers, start, dtype=dtype)
    throughput = await asyncio.to_thread(measure_throughput, span)
    caches = CacheManager(
        budget_bytes=config.cache_bytes, ttl_s=config.session_ttl_s, max_sessions=config.limits.max_sessions
    )
    # pushes go only to peers the DHT lists as serving the next blocks (node/blocks/push.py)
    push_policy = SwarmPushPolicy(lambda model: swarm_peers(swarm, config, model, total)) if config.push else NoPush()
    push_channels = PushChannels(grpc_options(config.limits.max_message_bytes(span.hidden_size)),
                                 timeout_s=config.limits.push_timeout_s, swarm_token=config.swarm_token,
                                 tls=config.tls)
    servicer = BlockServicer(
        span=span, model_name=config.model_name, caches=caches, limits=config.limits,
        node_id=lambda: swarm.peer_id, hardware=hardware, throughput_tok_s=throughput,
        push_policy=push_policy, push_channels=push_channels,
    )
    server, port = await start_grpc_server(servicer, config.host, config.port, swarm_token=config.swarm_token,
                                           tls=config.tls)
    address = f"{config.announce_host or config.host}:{port}"

    def record() -> NodeRecord:
        caches.expire()
        return NodeRecord(
            peer_id=swarm.peer_id, address=address, group=config.group, models=(config.model_name,),
            start_block=start, end_block=end, hardware=hardware, throughput_tok_s=round(throughput, 2),
            load=round(servicer.load, 4), free_cache_bytes=caches.free_bytes, num_blocks=total,
            tls=config.tls is not None,
        )

    def own_blocks() -> BlockRecord:
        return BlockRecord(
            peer_id=swarm.peer_id, address=address, group=config.group, start_block=start, end_block=end,
            throughput_tok_s=round(throughput, 2), free_cache_bytes=caches.free_bytes, load=round(servicer.load, 4),
            tls=config.tls is not None,
        )

    announcer = Announcer(swarm, config.model_name, record, period_s=config.announce_period_s,
                          ttl_s=config.record_ttl_s)
    try:
        await announcer.start()
        # the driver runs this node's own blocks in-process rather than calling itself over loopback
        local = LocalBlocks(steps=servicer.steps, caches=caches, max_length=servicer.max_length, record=own_blocks)
        engine = ChainEngine(
            model_path=str(model_dir), model_name=config.model_name, records=swarm, config=driver_config(config),
            weight_format=config.weight_format, local=local if config.local_blocks else None,
        )
    except BaseException:
        await announcer.close(withdraw=False)
        await server.stop(grace=None)
        await servicer.aclose()
        raise
    logger.info("serving blocks %d:%d of %s at %s (%.1f tok/s); DHT %s", start, end, config.model_name,
                address, throughput, swarm.maddrs)
    return ServingHandle(engine=engine, address=address, swarm=swarm, server=server, servicer=servicer,
                         announcer=announcer, push_channels=push_channels)
