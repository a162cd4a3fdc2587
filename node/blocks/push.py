"""Server-to-server push: a hop sends its output straight into the next hop's session.

In star mode the driver carries every hop's output to the next hop itself (2 messages
per hop per token). With a route (``InferenceStep.route``: the hops after the receiving
one), a server pushes its output into ``route[0]``'s session over a ``Push`` stream and
hands ``route[1:]`` on with it, so the critical path of a token is driver -> s1 -> s2 ->
... -> sn -> driver (n + 1 messages). Every hop still answers the driver with its output,
off the critical path, so the driver keeps each hop's inputs for replays.

A route comes from a peer, so nothing in it is trusted (:func:`parse_route`): addresses
must be ``host:port``, session ids bounded, block ranges must tile forward from the
pushing hop's end (so a route can never revisit a block: no loops), the route is no
longer than the model has blocks, and :class:`PushPolicy` decides which addresses a
node may connect to at all; the one nodes run with (:class:`SwarmPushPolicy`) only
allows peers the DHT lists as serving exactly those blocks of the model, so a driver
cannot point a node at arbitrary hosts. Sessions also refuse a step id they have seen
(see ``steps.py``), which bounds what any cycle could cost anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import grpc

from node.blocks.access import PeerChannels, SwarmAccess
from node.blocks.tls import TlsConfig
from proto import blocks_pb2, blocks_pb2_grpc
from proto.records import BlockRecord

logger = logging.getLogger(__name__)

MAX_SESSION_ID = 128
MAX_HOST = 253
_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$")


class RouteError(ValueError):
    """A route from a peer that is malformed or names hops this node may not push to."""


class PushError(RuntimeError):
    """The output could not be pushed to the next hop (the driver then carries the step itself)."""


@dataclass(frozen=True)
class PushTarget:
    """One downstream hop of a route."""

    address: str  # host:port of its BlockService
    session_id: str  # its session, opened by the driver
    start: int
    end: int

    def to_proto(self) -> blocks_pb2.PushTarget:
        return blocks_pb2.PushTarget(address=self.address, session_id=self.session_id, start_block=self.start,
                                     end_block=self.end)


def check_address(address: str) -> str:
    """``host:port`` with an IP literal (``[v6]`` bracketed) or a DNS name, and a port in 1..65535.

    :raises RouteError: naming what is wrong.
    """
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise RouteError(f"push address {address[:80]!r} is not host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not (0 < len(host) <= MAX_HOST and _HOSTNAME.match(host)):
            raise RouteError(f"push address {address[:80]!r} has no valid host") from None
    return address


def parse_route(route: Sequence[blocks_pb2.PushTarget], *, after: int, num_blocks: int) -> tuple[PushTarget, ...]:
    """Validate a route received by the hop whose blocks end at ``after``.

    :raises RouteError: on a bad address or session id, or blocks that do not tile ``after..`` forward.
    """
    if len(route) > num_blocks:
        raise RouteError(f"route of {len(route)} hops is longer than the model's {num_blocks} blocks")
    targets: list[PushTarget] = []
    at = after
    for entry in route:
        if not 0 < len(entry.session_id) <= MAX_SESSION_ID:
            raise RouteError(f"route session ids must be 1..{MAX_SESSION_ID} characters")
        if entry.start_block != at or not entry.start_block < entry.end_block <= num_blocks:
            raise RouteError(
                f"route hop {entry.start_block}:{entry.end_block} does not continue at block {at} "
                f"(of {num_blocks}); routes go forward through contiguous blocks"
            )
        targets.append(PushTarget(check_address(entry.address), entry.session_id, entry.start_block, entry.end_block))
        at = entry.end_block
    return tuple(targets)


class PushPolicy(Protocol):
    """Which peers this node may push to."""

    async def allows(self, model: str, target: PushTarget) -> bool: ...


class NoPush:
    """Pushing disabled: every route is answered with ``push_error`` and the driver carries the steps."""

    async def allows(self, model: str, target: PushTarget) -> bool:
        return False


class StaticPushPolicy:
    """Allows exactly the listed addresses (tests, fixed deployments)."""

    def __init__(self, addresses: Sequence[str]) -> None:
        self.addresses = frozenset(addresses)

    async def allows(self, model: str, target: PushTarget) -> bool:
        return target.address in self.addresses


class SwarmPushPolicy:
    """Allows a target only if the DHT lists a live peer at that address serving those blocks of the model.

    A yes is cached for ``max_age_s``, so a session pays for a DHT read only when it first meets a
    target; a no only for ``refusal_age_s``, so a peer that has just joined (a replacement the driver
    found) is allowed as soon as its records can be read.
    """

    def __init__(
        self,
        records: Callable[[str], Awaitable[list[BlockRecord]]],
        *,
        max_age_s: float = 10.0,
        refusal_age_s: float = 1.0,
    ) -> None:
        self._records = records  # model -> its live block records
        self.max_age_s = max_age_s
        self.refusal_age_s = refusal_age_s
        self._cache: dict[tuple[str, PushTarget], tuple[bool, float]] = {}

    async def allows(self, model: str, target: PushTarget) -> bool:
        key = (model, PushTarget(target.address, "", target.start, target.end))
        hit = self._cache.get(key)
        now = time.monotonic()
        if hit is not None and now - hit[1] < (self.max_age_s if hit[0] else self.refusal_age_s):
            return hit[0]
        try:
            records = await self._records(model)
        except Exception as exc:  # a DHT hiccup: refuse, the driver carries the step
            logger.info("cannot check push target %s: %s", target.address, exc)
            return False
        ok = any(r.address == target.address and r.start_block <= target.start and target.end <= r.end_block
                 for r in records)
        if len(self._cache) > 4096:
            self._cache.clear()
        self._cache[key] = (ok, now)
        return ok


class PushLink:
    """A ``Push`` stream from this node into one session of the next hop."""

    def __init__(self, stub: blocks_pb2_grpc.BlockServiceStub, target: PushTarget, *, timeout_s: float) -> None:
        """``stub`` from :meth:`PushChannels.link`: its calls carry the swarm token (node/blocks/access.py)."""
        self.target = target
        self.timeout_s = timeout_s
        self._call = stub.Push()

    async def send(self, message: blocks_pb2.InferenceStep) -> None:
        """Write one step; does not wait for the next hop to compute it.

        :raises PushError: the stream ended or the write did not go out within ``timeout_s``.
        """
        if self._call.done():
            raise PushError(f"push stream to {self.target.address} ended: {await self._status()}")
        try:
            async with asyncio.timeout(self.timeout_s):
                await self._call.write(message)
        except TimeoutError:
            self._call.cancel()
            raise PushError(f"push to {self.target.address} not sent within {self.timeout_s:.1f} s") from None
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError, OSError):
            raise PushError(f"push stream to {self.target.address} ended: {await self._status()}") from None

    async def _status(self) -> str:
        with contextlib.suppress(Exception):
            return f"{(await self._call.code()).name}: {await self._call.details()}"
        return "unknown"

    def abort(self) -> None:
        """Drop the stream at once (the session it served ended, or its target changed)."""
        self._call.cancel()


class PushChannels:
    """One channel per next-hop address, shared by the node's sessions (TLS ones with ``tls``)."""

    def __init__(
        self, options: list[tuple[str, int]], *, timeout_s: float = 5.0, swarm_token: str = "",
        tls: TlsConfig | None = None,
    ) -> None:
        self.options = options
        self.access = SwarmAccess(swarm_token=swarm_token, tls=tls)  # node/blocks/access.py
        self.tls = tls
        self.timeout_s = timeout_s
        self._peers = PeerChannels(self.access, options)

    def link(self, target: PushTarget) -> PushLink:
        return PushLink(self._peers.stub(target.address), target, timeout_s=self.timeout_s)

    async def close(self) -> None:
        await self._peers.close()
