"""The engine a node answers tasks with, and what must run beside it in the swarm.

Three shapes, chosen by :class:`node.node_config.NodeConfig`:

- sharded (``--blocks`` / ``--initial-peers``, local engine): this node serves a span of
  blocks over gRPC and announces it in the DHT (:mod:`node.blocks.launch`, or
  :mod:`node.accel.launch` with ``--accelerated``); its engine drives the chain through the swarm;
- vLLM (``--engine vllm``): the whole model on a GPU, and with ``--initial-peers`` a DHT
  presence that announces only its group (:mod:`node.announce`);
- local: the whole model in this process (:class:`node.local_engine.LocalEngine`).

The heavy imports happen only for the shape asked for. Each part is kept as soon as it is
running, so :meth:`EngineStack.close` also stops what a half-finished :meth:`EngineStack.build` started.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from node.engine import Engine
from node.engines.vllm_options import WEIGHT_FORMAT_OF_DTYPE
from node.node_config import NodeConfig
from proto.records import HardwareInfo

if TYPE_CHECKING:
    from hivemind.utils.crypto import RSAPrivateKey

logger = logging.getLogger(__name__)


class EngineStack:
    """The node's engine plus its block serving or DHT presence; built and closed together."""

    def __init__(self) -> None:
        self.engine: Engine | None = None
        self.serving: Any = None  # node.blocks.launch.ServingHandle when sharded
        self.presence: Any = None  # node.announce.QueueNodePresence for a whole-model node in the DHT

    @property
    def dht_peer_id(self) -> str | None:
        """The DHT peer id this node is known by in the swarm (None outside the DHT)."""
        identity = self.serving or self.presence
        return None if identity is None else str(identity.peer_id)

    async def build(self, cfg: NodeConfig, hardware: HardwareInfo, *, identity: RSAPrivateKey | None = None) -> int:
        """Build the engine; returns the model's context length (0 when unknown).

        ``identity``: the node's key; in the DHT its peer id derives from it (:meth:`SwarmDHT.start`).
        """
        if cfg.sharded:
            self.serving = await _start_serving(cfg, hardware, identity)
            self.engine = self.serving.engine
            logger.info("serving blocks %s at %s; DHT %s", cfg.blocks, self.serving.address,
                        " ".join(map(str, self.serving.dht_maddrs)))
            return await asyncio.to_thread(_model_config_int, cfg.model, "max_position_embeddings", 0)
        if cfg.engine == "vllm":
            from node.engines.vllm_engine import VllmEngine

            # built on the event loop's thread: vLLM's async engine belongs to the loop that uses it
            vllm_engine = VllmEngine.load(cfg.model, dtype=cfg.dtype, settings=cfg.vllm)
            self.engine = vllm_engine
            if cfg.announces_queue_node:
                self.presence = await _announce_queue_node(cfg, hardware, vllm_engine.methods, identity)
            return vllm_engine.max_positions
        from node.local_engine import LocalEngine

        engine = await asyncio.to_thread(LocalEngine.load, cfg.model, device=cfg.device, dtype=cfg.dtype)
        self.engine = engine
        return engine.max_positions

    async def close(self) -> None:
        """Withdraw from the DHT, then stop the serving side (which owns the engine) or the engine."""
        if self.presence is not None:
            await self.presence.close()
        if self.serving is not None:
            await self.serving.close()
        elif self.engine is not None:
            await self.engine.close()


def _model_config_int(name_or_path: str, attribute: str, default: int) -> int:
    """One integer of the model's config (``default`` when missing or 0), read without loading weights."""
    from transformers import AutoConfig

    return int(getattr(AutoConfig.from_pretrained(name_or_path), attribute, 0) or default)


async def _start_serving(cfg: NodeConfig, hardware: HardwareInfo, identity: RSAPrivateKey | None) -> Any:
    """Start the sharded serving side (node.blocks.launch), imported only when asked for."""
    from node.blocks.chain_engine import ChainConfig
    from node.blocks.launch import ServingConfig, start_serving

    start, end = cfg.blocks if cfg.blocks is not None else (None, None)
    serving_config = ServingConfig(
        model_path=cfg.model,
        model_name=cfg.model_name,
        group=cfg.group,
        start_block=start,
        end_block=end,
        host=cfg.host,
        port=cfg.port,
        dht_port=cfg.dht_port,
        announce_host=cfg.announce_host or None,
        initial_peers=tuple(cfg.initial_peers),
        weight_format=WEIGHT_FORMAT_OF_DTYPE[cfg.dtype],
        swarm_token=cfg.swarm_token,
        tls=cfg.tls,
        local_blocks=cfg.local_blocks,
        chain=ChainConfig(swarm_token=cfg.swarm_token, draft_model=cfg.draft, tls=cfg.tls),
    )
    if cfg.accelerated:
        from node.accel.launch import start_accelerated_serving

        return await start_accelerated_serving(serving_config, hardware, identity=identity)
    return await start_serving(serving_config, hardware, identity=identity)


async def _announce_queue_node(
    cfg: NodeConfig, hardware: HardwareInfo, methods: tuple[str, ...], identity: RSAPrivateKey | None
) -> Any:
    """Join the DHT and keep this whole-model node's record (no address, no blocks) fresh."""
    from node.announce import QueueNodeAnnouncement, QueueNodePresence

    num_blocks = await asyncio.to_thread(_model_config_int, cfg.model, "num_hidden_layers", 1)
    announcement = QueueNodeAnnouncement(model_name=cfg.model_name, group=cfg.group, num_blocks=num_blocks,
                                         hardware=hardware, methods=methods)
    return await QueueNodePresence.start(announcement, initial_peers=cfg.initial_peers, host=cfg.host,
                                         port=cfg.dht_port, announce_host=cfg.announce_host or None,
                                         identity=identity)
