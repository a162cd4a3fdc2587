"""A gRPC BlockService that applies acceleration methods on the server side of every hop.

Same wire contract as the plain block server (``proto/blocks.proto``); the per-session options a
driver sends in the stream metadata are :mod:`node.accel.session_metadata`, and the handlers that
run each session's steps are :mod:`node.accel.servicer`. This module is the server as a process
part: its config, loading the blocks, starting the step batcher, the gRPC options, swarm access
(token, TLS), the port, and closing.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from node.accel.batcher import StepBatcher
from node.accel.batching import BatchPolicy
from node.accel.executor import BlockExecutor
from node.accel.servicer import AccelBlockServicer
from node.accel.session_metadata import MD_METHOD, MD_PREFIX_BLOCK, MD_PREFIX_HASHES, MD_PREFIX_HIT, SessionOptions
from node.blocks.access import SwarmAccess
from node.blocks.tls import TlsConfig
from proto import blocks_pb2_grpc

__all__ = [  # the servicer and the session metadata live in servicer.py and session_metadata.py
    "MD_METHOD",
    "MD_PREFIX_BLOCK",
    "MD_PREFIX_HASHES",
    "MD_PREFIX_HIT",
    "AccelBlockServer",
    "AccelBlockServicer",
    "AccelServerConfig",
    "SessionOptions",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AccelServerConfig:
    """One accelerated block server."""

    model_path: Path  # local model directory (config.json + safetensors)
    model_name: str  # name peers use in requests
    start: int  # first block served
    end: int  # one past the last block served
    weight_format: str = "fp32"  # "fp32" | "bf16" | "int8": how this node's consumer group loads weights
    policy: BatchPolicy = field(default_factory=BatchPolicy)  # continuous/dynamic batching limits
    prefix_block_tokens: int = 32  # prefix-cache granularity, tokens per cached block
    prefix_cache_bytes: int = 256 * 1024 * 1024  # prefix cache budget
    cache_budget_bytes: int = 2 * 1024**3  # session KV caches budget (reserved at max_length)
    max_session_length: int = 4096  # longest session a client may ask for
    max_step_tokens: int = 4096  # most new tokens in one step
    session_idle_s: float = 120.0  # a session stream with no step for this long is closed
    max_message_bytes: int = 64 * 1024 * 1024  # gRPC message cap, both directions
    reply_delay_s: float = 0.0  # emulated network delay added before each step's reply (benchmarks only)
    host: str = "127.0.0.1"
    port: int = 0  # 0 = any free port
    # shared secret of a private swarm (node/blocks/auth.py): calls without it get UNAUTHENTICATED; "" = open
    swarm_token: str = field(default="", repr=False)
    tls: TlsConfig | None = None  # serve only TLS with the swarm's private CA (node/blocks/tls.py); None = plaintext


class AccelBlockServer:
    """An accelerated block server listening on a port: ``server = await AccelBlockServer.create(config)``."""

    def __init__(self, config: AccelServerConfig, servicer: AccelBlockServicer, server: grpc.aio.Server, port: int):
        self.config = config
        self.servicer = servicer
        self._server = server
        self.port = port

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    @property
    def grpc_server(self) -> grpc.aio.Server:
        return self._server

    @classmethod
    async def create(cls, config: AccelServerConfig, executor: BlockExecutor | None = None) -> AccelBlockServer:
        if executor is None:
            executor = await asyncio.to_thread(
                BlockExecutor.load, config.model_path, config.start, config.end, weight_format=config.weight_format
            )
        batcher = StepBatcher(executor, config.policy)
        await batcher.start()
        servicer = AccelBlockServicer(config, executor, batcher)
        options = [
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.max_receive_message_length", config.max_message_bytes),
            # drivers keep their channels alive with pings (node.blocks.wire.grpc_options): accept them
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
            ("grpc.http2.max_ping_strikes", 0),
        ]
        access = SwarmAccess(swarm_token=config.swarm_token, tls=config.tls)  # the same as node/blocks' server
        server = access.server(options)
        blocks_pb2_grpc.add_BlockServiceServicer_to_server(servicer, server)
        port = access.bind(server, config.host, config.port)
        await server.start()
        logger.info(
            "accelerated block server for %s %d:%d on port %d", config.model_name, config.start, config.end, port
        )
        return cls(config, servicer, server, port)

    async def close(self, grace: float = 1.0) -> None:
        await self._server.stop(grace)
        await self.servicer.batcher.close()
