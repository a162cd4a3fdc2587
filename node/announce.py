"""DHT presence for whole-model nodes that serve no blocks (a vLLM node on a GPU).

Brokers learn which consumer groups are live from the node records under ``dinet:nodes``
(:mod:`broker.directory`). Block servers announce theirs as part of serving (:mod:`node.blocks.launch`);
a node that holds the whole model in an engine other processes cannot call block by block only
takes tasks from its group queue, yet its group, hardware and methods must reach the brokers the
same way. Its record therefore carries no address (:attr:`proto.records.NodeRecord.serves_blocks`
is False), no block records are stored, and no chain routes through it; the record is refreshed
before it expires and withdrawn (tombstoned) on a clean stop, exactly like a block server's.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from node.blocks.dht import Announcer, SwarmDHT
from proto.records import HardwareInfo, NodeRecord

if TYPE_CHECKING:
    from hivemind.utils.crypto import RSAPrivateKey

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class QueueNodeAnnouncement:
    """What a whole-model node tells the swarm about itself."""

    model_name: str
    group: str
    num_blocks: int  # the model's transformer blocks (the record spans all of them)
    hardware: HardwareInfo
    methods: tuple[str, ...]  # dinet methods the engine runs per request ("" = not announced)
    throughput_tok_s: float = 0.0
    announce_period_s: float = 10.0
    record_ttl_s: float = 30.0

    def __post_init__(self) -> None:
        if self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")
        if not 0 < self.announce_period_s < self.record_ttl_s:
            raise ValueError("announce_period_s must be positive and shorter than record_ttl_s")

    def record(self, peer_id: str) -> NodeRecord:
        return NodeRecord(
            peer_id=peer_id, address="", group=self.group, models=(self.model_name,), start_block=0,
            end_block=self.num_blocks, hardware=self.hardware, throughput_tok_s=self.throughput_tok_s,
            num_blocks=self.num_blocks, methods=self.methods,
        )


class QueueNodePresence:
    """A DHT peer plus the announcer that keeps one queue-only node record fresh; ``close()`` withdraws it."""

    def __init__(self, swarm: SwarmDHT, announcer: Announcer) -> None:
        self.swarm = swarm
        self.announcer = announcer

    @property
    def peer_id(self) -> str:
        return self.swarm.peer_id

    @classmethod
    async def start(
        cls,
        announcement: QueueNodeAnnouncement,
        *,
        initial_peers: Sequence[str],
        host: str = "127.0.0.1",
        port: int = 0,
        announce_host: str | None = None,
        identity: RSAPrivateKey | None = None,
    ) -> QueueNodePresence:
        """Join the swarm through ``initial_peers`` and announce once (the group is visible when this returns).

        ``identity``: the node's key, its DHT peer id derives from it (:meth:`SwarmDHT.start`).

        :raises RuntimeError: the DHT process did not start.
        """
        swarm = await asyncio.to_thread(
            SwarmDHT.start, initial_peers=initial_peers, host=host, port=port, announce_host=announce_host,
            identity=identity,
        )
        announcer = Announcer(
            swarm, announcement.model_name, lambda: announcement.record(swarm.peer_id),
            period_s=announcement.announce_period_s, ttl_s=announcement.record_ttl_s,
        )
        try:
            await announcer.start()
        except BaseException:
            await asyncio.to_thread(swarm.shutdown)
            raise
        logger.info("announced group %s (model %s, methods %s) in the DHT as a queue-only node %s",
                    announcement.group, announcement.model_name, ",".join(announcement.methods) or "all",
                    swarm.peer_id)
        return cls(swarm, announcer)

    async def close(self, *, withdraw: bool = True) -> None:
        try:
            await self.announcer.close(withdraw=withdraw)
        finally:
            await asyncio.to_thread(self.swarm.shutdown)
