"""Start a DHT-announced node whose block server is the accelerated one (:mod:`node.accel.server`).

Same contract as :func:`node.blocks.launch.start_serving` (same :class:`ServingConfig`, same
:class:`ServingHandle`, same DHT records and chain driver), but the node's gRPC service batches
concurrent sessions' steps, keeps a prefix cache and honours per-session method metadata. The
plain server stays the default; ``dinet-node run`` chooses this one when asked to accelerate.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch

from node.accel.batching import BatchPolicy
from node.accel.executor import BlockExecutor, StepItem
from node.accel.server import AccelBlockServer, AccelServerConfig
from node.blocks.chain_engine import ChainEngine
from node.blocks.dht import Announcer, SwarmDHT
from node.blocks.launch import ServingConfig, ServingHandle, driver_config
from node.blocks.loader import load_config, resolve_model_dir
from node.blocks.server import BlockServicer
from proto.records import HardwareInfo, NodeRecord

if TYPE_CHECKING:
    from hivemind.utils.crypto import RSAPrivateKey

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AccelOptions:
    """Knobs of the accelerated server on top of :class:`ServingConfig`."""

    policy: BatchPolicy = field(default_factory=BatchPolicy)  # continuous/dynamic batching limits
    prefix_block_tokens: int = 32  # prefix-cache granularity (drivers use 32 by default)
    prefix_cache_bytes: int = 256 * 1024 * 1024  # prefix cache budget, on top of the session budget


def measure_decode_tok_s(executor: BlockExecutor, *, steps: int = 8, context: int = 32) -> float:
    """Decode tokens/s of the loaded span at one session (for the DHT record)."""
    kv = executor.new_cache(capacity=context + steps + 1)
    executor.forward([StepItem(kv, torch.zeros(context, executor.hidden_size))])
    begin = time.perf_counter()
    for _ in range(steps):
        executor.forward([StepItem(kv, torch.zeros(1, executor.hidden_size))])
    return steps / max(time.perf_counter() - begin, 1e-9)


async def start_accelerated_serving(
    config: ServingConfig, hardware: HardwareInfo, options: AccelOptions | None = None, *,
    identity: RSAPrivateKey | None = None,
) -> ServingHandle:
    """Join the DHT, load the blocks, serve them with the accelerated server and announce them.

    ``identity``: the node's key, its DHT peer id derives from it (:meth:`SwarmDHT.start`).

    :raises ValueError: for a block range outside the model or an unknown weight format.
    """
    options = options or AccelOptions()
    swarm = await asyncio.to_thread(
        SwarmDHT.start, initial_peers=config.initial_peers, host=config.host, port=config.dht_port,
        announce_host=config.announce_host, identity=identity,
    )
    try:
        model_dir = await asyncio.to_thread(resolve_model_dir, config.model_path)
        total = int(load_config(model_dir).num_hidden_layers)
        start = 0 if config.start_block is None else config.start_block
        end = total if config.end_block is None else config.end_block
        executor = await asyncio.to_thread(BlockExecutor.load, model_dir, start, end,
                                           weight_format=config.weight_format)
        throughput = await asyncio.to_thread(measure_decode_tok_s, executor)
        server = await AccelBlockServer.create(
            AccelServerConfig(
                model_path=Path(model_dir), model_name=config.model_name, start=start, end=end,
                weight_format=config.weight_format, policy=options.policy,
                prefix_block_tokens=options.prefix_block_tokens, prefix_cache_bytes=options.prefix_cache_bytes,
                cache_budget_bytes=config.cache_bytes, session_idle_s=config.session_ttl_s,
                max_session_length=min(config.limits.max_length, int(executor.config.max_position_embeddings)),
                host=config.host, port=config.port, swarm_token=config.swarm_token, tls=config.tls,
            ),
            executor=executor,
        )
    except BaseException:
        await asyncio.to_thread(swarm.shutdown)
        raise
    servicer = server.servicer
    address = f"{config.announce_host or config.host}:{server.port}"

    def record() -> NodeRecord:
        return NodeRecord(
            peer_id=swarm.peer_id, address=address, group=config.group, models=(config.model_name,),
            start_block=start, end_block=end, hardware=hardware, throughput_tok_s=round(throughput, 2),
            load=round(servicer.load, 4), free_cache_bytes=servicer.free_cache_bytes, num_blocks=total,
            tls=config.tls is not None,
        )

    announcer = Announcer(swarm, config.model_name, record, period_s=config.announce_period_s,
                          ttl_s=config.record_ttl_s)
    try:
        await announcer.start()
        # the driver carries the swarm's token and TLS on every call, as node.blocks.launch's does
        engine = ChainEngine(model_path=str(model_dir), model_name=config.model_name, records=swarm,
                             config=driver_config(config), weight_format=config.weight_format)
    except BaseException:
        await announcer.close(withdraw=False)
        await server.close(grace=0)
        await asyncio.to_thread(swarm.shutdown)
        raise
    logger.info("serving blocks %d:%d of %s at %s, accelerated (%.1f tok/s)", start, end, config.model_name,
                address, throughput)
    # ServingHandle stops the gRPC server, then calls servicer.close(): the accelerated servicer has both
    return ServingHandle(engine=engine, address=address, swarm=swarm, server=server.grpc_server,
                         servicer=cast(BlockServicer, servicer), announcer=announcer)
