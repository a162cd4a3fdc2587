"""How a node reaches and admits swarm peers over gRPC: the one place that builds channels, stubs and servers.

A swarm is private by two independent means: TLS with the swarm's CA (:mod:`node.blocks.tls`) and a
shared swarm token in every call's metadata (:mod:`node.blocks.auth`). Both must be applied the same
way on every path, or some path quietly stays open (an ``AccelChain`` that opened its own channels once
sent no token at all). So every client of ``BlockService`` in ``node/`` (the driver's
:class:`~node.blocks.remote.ChannelPool`, the hops' :class:`~node.blocks.push.PushChannels`,
:class:`node.accel.chain.AccelChain`) gets its channels and stubs from a :class:`SwarmAccess`, and both
block servers get their ``grpc.aio.Server`` and port from one too. :class:`PeerChannels` is the channel
cache those clients share the code of: one channel per peer address, opened through the access.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import grpc

from node.blocks.auth import TokenStub, call_metadata, check_swarm_token, server_interceptors
from node.blocks.tls import TlsConfig, bind_port, open_channel
from proto import blocks_pb2_grpc


@dataclass(frozen=True)
class SwarmAccess:
    """This side's membership of a swarm: the token its calls carry and demand, and its TLS identity.

    Both default to an open swarm (no token, plaintext). Built once per role from its config and shared
    by everything that dials or serves for it.

    :raises ValueError: for a malformed token (the message never quotes it).
    """

    swarm_token: str = field(default="", repr=False)  # "" = open swarm; never logged
    tls: TlsConfig | None = None  # None = plaintext channels and ports

    def __post_init__(self) -> None:
        check_swarm_token(self.swarm_token)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Metadata for calls made on a raw channel (empty for an open swarm); stubs of :meth:`stub` add it."""
        return call_metadata(self.swarm_token)

    def open_channel(self, address: str, options: Sequence[tuple[str, Any]]) -> grpc.aio.Channel:
        """A channel to the peer at ``address`` (TLS verified against the swarm CA when configured)."""
        return open_channel(address, options, self.tls)

    def stub(self, channel: grpc.aio.Channel) -> blocks_pb2_grpc.BlockServiceStub:
        """A ``BlockService`` stub on ``channel`` whose every call carries the token, whatever metadata is passed.

        Per call rather than by a channel interceptor: grpc.aio's client interceptors do not support the
        write/read style of the ``Inference``, ``InferenceBatch`` and ``Push`` streams.
        """
        stub = blocks_pb2_grpc.BlockServiceStub(channel)
        if not self.swarm_token:
            return stub
        return cast(blocks_pb2_grpc.BlockServiceStub, TokenStub(stub, self.swarm_token))

    def server(self, options: Sequence[tuple[str, Any]]) -> grpc.aio.Server:
        """A ``grpc.aio`` server that refuses calls without the token (UNAUTHENTICATED) before any handler runs."""
        return grpc.aio.server(options=list(options), interceptors=server_interceptors(self.swarm_token))

    def bind(self, server: grpc.aio.Server, host: str, port: int) -> int:
        """Bind ``host:port`` (TLS only, when configured); returns the bound port.

        :raises OSError: when the address cannot be bound.
        """
        bound = bind_port(server, f"{host}:{port}", self.tls)
        if bound == 0:
            raise OSError(f"cannot bind the gRPC server to {host}:{port}")
        return bound


class PeerChannels:
    """One channel per peer address, opened through ``access`` and reused by every call to that peer."""

    def __init__(self, access: SwarmAccess, options: Sequence[tuple[str, Any]]) -> None:
        self.access = access
        self.options = list(options)  # gRPC channel options (message size caps, keepalive)
        self._channels: dict[str, grpc.aio.Channel] = {}

    def channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = self.access.open_channel(address, self.options)
            self._channels[address] = channel
        return channel

    def stub(self, address: str) -> blocks_pb2_grpc.BlockServiceStub:
        """The peer's stub; every call through it carries the swarm token (:meth:`SwarmAccess.stub`)."""
        return self.access.stub(self.channel(address))

    async def close(self) -> None:
        """Close every channel (calls still open on them end with CANCELLED); never raises."""
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            with contextlib.suppress(Exception):
                await channel.close(grace=None)
