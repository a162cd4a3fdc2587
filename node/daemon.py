"""A node's lifecycle: measure the hardware, build the engine, run the task worker, stop cleanly.

``dinet-node run`` builds a :class:`NodeConfig` and calls :func:`run_node`. Without a block
range the node holds the whole model (:class:`node.local_engine.LocalEngine`); with
``--blocks`` or ``--initial-peers`` it serves a span of blocks over gRPC and drives the
chain through the swarm (:mod:`node.blocks.launch`); with ``--engine vllm`` vLLM holds the
whole model on a GPU (:mod:`node.engines.vllm_engine`), and with ``--initial-peers`` it joins the
DHT only to announce its group (:mod:`node.announce`). Whatever the engine, the same
:class:`node.worker.TaskWorker` answers the group's tasks.

Signals: the first SIGTERM or SIGINT drains (no new tasks; running ones get
``drain_grace_s`` to finish, then go back to the queue); a second one requeues at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aio_pika
from aio_pika.abc import AbstractRobustConnection

from broker.config import ReputationConfig
from node.blocks.auth import check_swarm_token, swarm_token_from_env
from node.blocks.tls import TlsConfig
from node.dedup import CompletedLedger
from node.engine import Engine
from node.engines.vllm_options import VllmSettings
from node.fence import check_reputation_config
from node.hardware import measure_hardware
from node.validation import Limits
from node.worker import TaskWorker, WorkerConfig
from proto.process import reap_children
from proto.records import HardwareInfo
from proto.settings import DEFAULT_AMQP_URL
from proto.topology import DEFAULT_NAMESPACE, validate_name

if TYPE_CHECKING:
    from node.accel.draft import DraftModelConfig

logger = logging.getLogger(__name__)

WEIGHT_FORMAT_OF_DTYPE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
ENGINES = ("local", "vllm")  # local: this process's torch code (whole model, or the block chain); vllm: a GPU
NODE_ID_FILE = "node_id"


@dataclass
class NodeConfig:
    """Everything one node needs; each field is a ``dinet-node run`` option."""

    model: str  # local path or hub name, read with from_pretrained
    model_name: str  # the name agents ask for (InferenceRequest.model)
    group: str  # consumer group: the node consumes <namespace>.group.<group>
    amqp_url: str = DEFAULT_AMQP_URL  # from --amqp-url or DINET_AMQP_URL
    namespace: str = DEFAULT_NAMESPACE  # queue name prefix; tests and demos use their own
    prefetch: int = 4  # tasks held (and computed concurrently) at once
    price_per_hour: float = 0.0  # operator-declared price, used for cost budgets
    state_dir: Path | None = None  # node id + dedup ledger; default ~/.local/state/dinet/<namespace>-<group>
    node_id: str = ""  # default: kept in the state dir, made once from the host name
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:1" ...
    dtype: str = "float32"  # weights: float32 | bfloat16 | float16
    threads: int = 0  # torch CPU threads; 0 = torch's default (one per core)
    max_new_tokens: int = 4096  # largest max_new_tokens accepted
    drain_grace_s: float = 30.0  # on SIGTERM: time running tasks get before they are requeued
    telemetry_lookback_s: float = 24 * 3600.0  # telemetry replayed at start for dedup (0 = off)
    connect_timeout_s: float = 60.0  # keep retrying the first connection to RabbitMQ this long
    # stop consuming while the brokers' reputation ledger (rebuilt here from telemetry) puts this node below
    # reputation.threshold (node/fence.py); same knobs as `dinet-broker run`, so keep them equal
    reputation_fence: bool = True
    reputation: ReputationConfig = field(default_factory=ReputationConfig)
    # sharded serving (node.blocks); used when blocks or initial_peers are given
    blocks: tuple[int, int] | None = None  # [start, end) block range this node serves
    initial_peers: tuple[str, ...] = ()  # DHT multiaddrs to join
    host: str = "127.0.0.1"  # gRPC and DHT listen address
    port: int = 0  # gRPC port (0 = any free port)
    dht_port: int = 0  # DHT port (0 = any free port)
    announce_host: str = ""  # address other nodes reach this one at, when not ``host`` (NAT, 0.0.0.0)
    accelerated: bool = False  # serve with node/accel's server: continuous batching + prefix cache
    draft_model: str = ""  # the chain driver's draft model for spec_draft (a local dir, --model's tokenizer)
    draft_weight_format: str = "fp32"  # fp32 | bf16 | int8: how the driver loads the draft model
    # every gRPC call of the block swarm carries it and this node's server refuses calls without it
    # (node/blocks/auth.py); default $DINET_SWARM_TOKEN, "" = open swarm; never logged
    swarm_token: str = field(default_factory=swarm_token_from_env, repr=False)
    tls: TlsConfig | None = None  # the block swarm's gRPC over TLS with its private CA (node/blocks/tls.py)
    engine: str = "local"  # "local" | "vllm" (whole model on a GPU; see node.engines)
    vllm: VllmSettings = field(default_factory=VllmSettings)  # used with engine="vllm"

    def __post_init__(self) -> None:
        validate_name("group name", self.group)
        validate_name("namespace", self.namespace)
        if self.prefetch < 1:
            raise ValueError(f"prefetch must be >= 1, got {self.prefetch}")
        if self.dtype not in WEIGHT_FORMAT_OF_DTYPE:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose one of {', '.join(WEIGHT_FORMAT_OF_DTYPE)}")
        if self.engine not in ENGINES:
            raise ValueError(f"unknown engine {self.engine!r}; choose one of {', '.join(ENGINES)}")
        if self.engine == "vllm" and (self.blocks is not None or self.accelerated):
            raise ValueError(
                "--engine vllm serves the whole model on one GPU; drop --blocks and --accelerated (those are the "
                "CPU block chain's). With --initial-peers a vLLM node joins the DHT only to announce its group"
            )
        check_swarm_token(self.swarm_token)
        check_reputation_config(self.reputation)
        self._check_draft_model()

    def _check_draft_model(self) -> None:
        """A draft model must exist and speak --model's token ids; checked here so a typo is exit 2 at start."""
        if not self.draft_model:
            return
        if not self.sharded:
            raise ValueError(
                "--draft-model is for the block chain driver (--blocks / --initial-peers); "
                "with --engine vllm use --vllm-draft-model"
            )
        if not Path(self.draft_model).is_dir():
            raise ValueError(f"--draft-model {self.draft_model}: no such directory")
        from node.accel.draft import check_draft_compatible
        from node.accel.weights import check_weight_format

        check_weight_format(self.draft_weight_format)
        if Path(self.model).is_dir():  # a hub model is checked once downloaded, by the driver
            check_draft_compatible(Path(self.draft_model), Path(self.model))

    @property
    def draft(self) -> DraftModelConfig | None:
        """The driver's draft model configuration (None without --draft-model)."""
        if not self.draft_model:
            return None
        from node.accel.draft import DraftModelConfig

        return DraftModelConfig(Path(self.draft_model), weight_format=self.draft_weight_format)

    @property
    def weight_format(self) -> str:
        """What this node reports as its weight format (hardware embedding, telemetry)."""
        if self.engine == "vllm":
            return self.vllm.weight_format(self.dtype)
        return WEIGHT_FORMAT_OF_DTYPE[self.dtype]

    @property
    def sharded(self) -> bool:
        """Serves blocks over gRPC (local engine with --blocks or --initial-peers)."""
        return self.engine == "local" and (self.blocks is not None or bool(self.initial_peers))

    @property
    def announces_queue_node(self) -> bool:
        """A whole-model node outside the block chain (vLLM) that announces its group in the DHT."""
        return not self.sharded and bool(self.initial_peers)

    def resolved_state_dir(self) -> Path:
        if self.state_dir is not None:
            return Path(self.state_dir)
        base = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
        return base / "dinet" / f"{self.namespace}-{self.group}"


def stable_node_id(state_dir: Path) -> str:
    """The node's id, made once (host name + random suffix) and kept in the state directory."""
    path = state_dir / NODE_ID_FILE
    if path.exists():
        existing = path.read_text(encoding="utf-8").strip()
        if existing:
            return existing
    host = "".join(c if c.isalnum() or c in "-_." else "-" for c in socket.gethostname())[:40] or "node"
    node_id = f"{host}-{secrets.token_hex(3)}"
    path.write_text(node_id + "\n", encoding="utf-8")
    return node_id


async def connect(url: str, *, timeout_s: float) -> AbstractRobustConnection:
    """A robust connection (it reconnects by itself later); the first connect is retried with backoff."""
    deadline = time.monotonic() + timeout_s
    delay = 0.5
    while True:
        try:
            return await aio_pika.connect_robust(url, timeout=10)
        except (ConnectionError, OSError, aio_pika.exceptions.AMQPConnectionError) as exc:
            if time.monotonic() + delay > deadline:
                raise ConnectionError(
                    f"cannot reach RabbitMQ at {_redact(url)} ({exc}); start it (scripts/setup.sh does) "
                    "or pass --amqp-url / DINET_AMQP_URL"
                ) from exc
            logger.warning("RabbitMQ not reachable yet (%s); retrying in %.1f s", exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


def _redact(url: str) -> str:
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.split('@', 1)[1]}"


class NodeDaemon:
    """One running node. ``await start()``, then ``await stop()`` (or :meth:`run` for both around signals)."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.hardware: HardwareInfo | None = None
        self.worker: TaskWorker | None = None
        self._engine: Engine | None = None
        self._serving: Any = None  # node.blocks.launch.ServingHandle when sharded
        self._presence: Any = None  # node.announce.QueueNodePresence for a whole-model node in the DHT
        self._ledger: CompletedLedger | None = None
        self._connection: AbstractRobustConnection | None = None
        self._stop = asyncio.Event()
        self._signals = 0

    async def start(self) -> None:
        cfg = self.config
        state_dir = cfg.resolved_state_dir()
        self._ledger = CompletedLedger(state_dir)  # fails fast if another node holds the directory
        if cfg.threads > 0:
            import torch

            torch.set_num_threads(cfg.threads)
        node_id = cfg.node_id or stable_node_id(state_dir)
        self.hardware = await asyncio.to_thread(
            measure_hardware, weight_format=cfg.weight_format, price_per_hour=cfg.price_per_hour
        )
        logger.info("node %s hardware: %s", node_id, self.hardware.description)
        tokenizer = await asyncio.to_thread(_load_tokenizer, cfg.model)
        max_positions = await self._build_engine(self.hardware)
        identity = self._serving or self._presence
        if identity is not None and not cfg.node_id:
            node_id = str(identity.peer_id)  # one identity: the DHT key pair, as brokers see it
        self._connection = await connect(cfg.amqp_url, timeout_s=cfg.connect_timeout_s)
        worker_config = WorkerConfig(
            node_id=node_id,
            group=cfg.group,
            limits=Limits(model_name=cfg.model_name, max_new_tokens=cfg.max_new_tokens, max_positions=max_positions),
            namespace=cfg.namespace,
            prefetch=cfg.prefetch,
            drain_grace_s=cfg.drain_grace_s,
            telemetry_lookback_s=cfg.telemetry_lookback_s,
            hardware=self.hardware,
            reputation=cfg.reputation,
            fence=cfg.reputation_fence,
        )
        if self._engine is None:
            raise RuntimeError("no engine was built")
        self.worker = TaskWorker(worker_config, engine=self._engine, tokenizer=tokenizer, ledger=self._ledger)
        await self.worker.start(self._connection)
        methods = ", ".join(getattr(self._engine, "methods", ("baseline",)))
        logger.info("node %s ready: model %s as %r, group %s, namespace %s, engine %s running methods: %s",
                    node_id, cfg.model, cfg.model_name, cfg.group, cfg.namespace, cfg.engine, methods)

    async def _build_engine(self, hardware: HardwareInfo) -> int:
        """Build the engine; returns the model's context length (0 when unknown)."""
        cfg = self.config
        if cfg.sharded:
            self._serving = await _start_serving(cfg, hardware)
            self._engine = self._serving.engine
            logger.info("serving blocks %s at %s; DHT %s", cfg.blocks, self._serving.address,
                        " ".join(map(str, self._serving.dht_maddrs)))
            return await asyncio.to_thread(_max_positions, cfg.model)
        if cfg.engine == "vllm":
            from node.engines.vllm_engine import VllmEngine

            # built on the event loop's thread: vLLM's async engine belongs to the loop that uses it
            vllm_engine = VllmEngine.load(cfg.model, dtype=cfg.dtype, settings=cfg.vllm)
            self._engine = vllm_engine
            if cfg.announces_queue_node:
                self._presence = await _announce_queue_node(cfg, hardware, vllm_engine.methods)
            return vllm_engine.max_positions
        from node.local_engine import LocalEngine

        engine = await asyncio.to_thread(LocalEngine.load, cfg.model, device=cfg.device, dtype=cfg.dtype)
        self._engine = engine
        return engine.max_positions

    def request_stop(self) -> None:
        """Signal handler: first call drains gracefully, a second one requeues running tasks at once."""
        self._signals += 1
        if self._signals == 1:
            logger.info("stop requested: draining (grace %.1f s; signal again to requeue now)",
                        self.config.drain_grace_s)
        else:
            logger.warning("second stop request: requeueing running tasks now")
        self._stop.set()

    async def stop(self) -> None:
        """Drain the worker, then close the engine, the connection and the ledger."""
        if self.worker is not None:
            drain = asyncio.create_task(self.worker.drain())
            while not drain.done():
                signals = self._signals
                await asyncio.wait({drain}, timeout=0.1)
                if self._signals > max(1, signals) and not drain.done():
                    drain.cancel()
                    await self.worker.drain(0.0)
                    break
            with contextlib.suppress(asyncio.CancelledError):
                await drain
            await self.worker.close()
        if self._presence is not None:
            await self._presence.close()
        if self._serving is not None:
            await self._serving.close()
        elif self._engine is not None:
            await self._engine.close()
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await self._connection.close()
        if self._ledger is not None:
            self._ledger.close()
        logger.info("node stopped")

    async def run(self) -> int:
        """Start, serve until SIGTERM/SIGINT, stop. Returns the process exit status."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        try:
            await self.start()
            await self._stop.wait()
        finally:
            await self.stop()
        return 0


def _load_tokenizer(name_or_path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name_or_path)


def _max_positions(name_or_path: str) -> int:
    from transformers import AutoConfig

    return int(getattr(AutoConfig.from_pretrained(name_or_path), "max_position_embeddings", 0) or 0)


async def _start_serving(cfg: NodeConfig, hardware: HardwareInfo) -> Any:
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
        chain=ChainConfig(swarm_token=cfg.swarm_token, draft_model=cfg.draft, tls=cfg.tls),
    )
    if cfg.accelerated:
        from node.accel.launch import start_accelerated_serving

        return await start_accelerated_serving(serving_config, hardware)
    return await start_serving(serving_config, hardware)


async def _announce_queue_node(cfg: NodeConfig, hardware: HardwareInfo, methods: tuple[str, ...]) -> Any:
    """Join the DHT and keep this whole-model node's record (no address, no blocks) fresh."""
    from node.announce import QueueNodeAnnouncement, QueueNodePresence

    num_blocks = await asyncio.to_thread(_num_blocks, cfg.model)
    announcement = QueueNodeAnnouncement(model_name=cfg.model_name, group=cfg.group, num_blocks=num_blocks,
                                         hardware=hardware, methods=methods)
    return await QueueNodePresence.start(announcement, initial_peers=cfg.initial_peers, host=cfg.host,
                                         port=cfg.dht_port, announce_host=cfg.announce_host or None)


def _num_blocks(name_or_path: str) -> int:
    from transformers import AutoConfig

    return int(getattr(AutoConfig.from_pretrained(name_or_path), "num_hidden_layers", 0) or 1)


def run_node(config: NodeConfig) -> int:
    """Blocking entry point used by ``dinet-node run``."""
    try:
        return asyncio.run(NodeDaemon(config).run())
    finally:
        reap_children()
