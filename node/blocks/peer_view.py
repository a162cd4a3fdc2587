"""What a driver knows about the swarm's peers across requests: their records, RTTs and bans.

:class:`PeerView` answers one question for :class:`~node.blocks.chain_engine.ChainEngine`,
its sessions and the acceleration driver: which peers should carry blocks ``start..end-1``
now (:meth:`PeerView.route`). It reads the DHT records (cached ``records_max_age_s``, re-read
after any failure), probes the RTT of peers it has not measured lately (one that refuses is
banned, one that is slow becomes a last resort), remembers the peers that failed a step
(:meth:`PeerView.ban`), and adds the node's own blocks (:mod:`node.blocks.local_span`) at RTT 0.

It stands apart from the engine because it is state shared by every request over time, while
the engine turns one request into tokens; the routing arithmetic itself is
:func:`node.blocks.routing.find_route`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import TYPE_CHECKING, Protocol

import grpc

from node.blocks.local_span import LocalBlocks
from node.blocks.remote import ChannelPool, probe_rtt_ms
from node.blocks.routing import Hop, find_route
from proto.errors import NoRouteError
from proto.records import BlockRecord

if TYPE_CHECKING:
    from node.blocks.chain_engine import ChainConfig

logger = logging.getLogger(__name__)


class RecordSource(Protocol):
    """Where the driver learns who serves which blocks (:class:`node.blocks.dht.SwarmDHT`, or a fixed list)."""

    async def block_records(self, model: str, num_blocks: int) -> list[BlockRecord]: ...


class PeerView:
    """Records, RTTs and bans of one model's peers, and the cheapest route over them."""

    def __init__(
        self,
        records: RecordSource,
        *,
        model_name: str,
        num_blocks: int,
        config: ChainConfig,
        pool: ChannelPool,
        local: LocalBlocks | None = None,
    ) -> None:
        self.records = records
        self.model_name = model_name
        self.num_blocks = num_blocks
        self.config = config
        self.pool = pool  # probes go over the driver's channels (token, TLS)
        self.local = local
        self._records: list[BlockRecord] = []
        self._records_at = 0.0
        self._rtt: dict[str, tuple[float, float]] = {}  # peer -> (rtt ms, measured at)
        self._banned: dict[str, tuple[float, bool]] = {}  # peer -> (until, dead)
        self._rng = random.Random()

    async def route(self, start: int, end: int, *, refresh: bool = False) -> list[Hop]:
        """The cheapest live route over blocks ``start..end-1``; probes peers whose RTT is unknown.

        Without a route it re-reads the DHT a few times first (a lookup can come back incomplete on a busy
        swarm, and a node may be joining), then raises :class:`NoRouteError`.
        """
        attempt = 0
        while True:
            try:
                return await self._route_once(start, end, refresh=refresh or attempt > 0)
            except NoRouteError as exc:
                attempt += 1
                if attempt >= self.config.route_attempts:
                    raise
                logger.info("no route yet (%s); reading the DHT again", exc)
                await asyncio.sleep(0.25 * 2 ** (attempt - 1))

    async def _route_once(self, start: int, end: int, *, refresh: bool) -> list[Hop]:
        records = await self._live_records(refresh=refresh)
        await self._probe([r for r in records if not self._is_banned(r.peer_id)])
        now = time.monotonic()
        banned = {p: dead for p, (until, dead) in self._banned.items() if until > now}
        rtt_ms = {peer: rtt for peer, (rtt, _) in self._rtt.items()}
        try:
            return find_route(records, start=start, end=end, model=self.model_name, rtt_ms=rtt_ms,
                              exclude=banned, costs=self.config.costs, rng=self._rng)
        except NoRouteError:
            # peers that were only slow or full are better than no route at all (retries stay bounded)
            alive = [p for p, dead in banned.items() if dead]
            if len(alive) == len(banned):
                raise
            hops = find_route(records, start=start, end=end, model=self.model_name, rtt_ms=rtt_ms,
                              exclude=alive, costs=self.config.costs, rng=self._rng)
            logger.warning("no route without recently failed peers; retrying through %s", [h.peer_id for h in hops])
            return hops

    async def ban(self, hop: Hop, *, dead: bool = True) -> None:
        """Leave the peer out of routes for ``ban_s``; one that is not ``dead`` (slow, full) stays a last resort.

        Its channel stays: other sessions on a peer that is merely full keep working, and gRPC reconnects by
        itself if it comes back."""
        self._banned[hop.peer_id] = (time.monotonic() + self.config.ban_s, dead)
        self._rtt.pop(hop.peer_id, None)

    def _is_banned(self, peer_id: str) -> bool:
        return self._banned.get(peer_id, (0.0, False))[0] > time.monotonic()

    async def _live_records(self, *, refresh: bool) -> list[BlockRecord]:
        if refresh or time.monotonic() - self._records_at > self.config.records_max_age_s:
            records = await self.records.block_records(self.model_name, self.num_blocks)
            # a peer of the other TLS mode would only fail its handshake: leave it out rather than fail a hop
            tls = self.config.tls is not None
            self._records = [r for r in records if r.tls == tls]
            if len(self._records) < len(records):
                logger.debug("left out %d peers that speak %s", len(records) - len(self._records),
                             "plaintext" if tls else "only TLS")
            if self.local is not None:  # its own blocks, even before (or without) its DHT record
                own = self.local.record()
                self._records = [r for r in self._records if r.peer_id != own.peer_id] + [own]
                self._rtt[own.peer_id] = (0.0, time.monotonic())  # no network between a driver and itself
            self._records_at = time.monotonic()
        return self._records

    async def _probe(self, records: list[BlockRecord]) -> None:
        now = time.monotonic()
        stale = [r for r in records if now - self._rtt.get(r.peer_id, (0.0, -1e9))[1] > self.config.rtt_max_age_s]

        async def probe(record: BlockRecord) -> None:
            try:
                rtt = await probe_rtt_ms(self.pool, record.address, timeout_s=self.config.probe_timeout_s)
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    # slow, not necessarily dead (a busy host, a cold start): last resort, not banned; a step
                    # that really fails bans it
                    logger.info("peer %s at %s is slow to answer; routing around it if possible", record.peer_id,
                                record.address)
                    self._rtt[record.peer_id] = (self.config.probe_timeout_s * 1000.0 * 10, time.monotonic())
                    return
                logger.info("peer %s at %s does not answer (%s); leaving it out", record.peer_id, record.address,
                            exc.code().name)
                await self.ban(Hop(record.peer_id, record.address, record.start_block, record.end_block), dead=True)
                return
            self._rtt[record.peer_id] = (rtt, time.monotonic())

        await asyncio.gather(*(probe(r) for r in stale))
