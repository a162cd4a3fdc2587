"""A node's lifecycle: measure the hardware, build the engine, run the task worker, stop cleanly.

``dinet-node run`` builds a :class:`node.node_config.NodeConfig` and calls :func:`run_node`.
What the node computes with, and what it runs in the swarm beside it (block serving, DHT
presence), is :class:`node.engine_stack.EngineStack`'s business; whatever the engine, the
same :class:`node.worker.TaskWorker` answers the group's tasks.

Signals: the first SIGTERM or SIGINT drains (no new tasks; running ones get
``drain_grace_s`` to finish, then go back to the queue); a second one requeues at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from aio_pika.abc import AbstractRobustConnection

from node.amqp_connect import connect
from node.dedup import CompletedLedger
from node.engine_stack import EngineStack
from node.hardware import measure_hardware
from node.node_config import NodeConfig
from node.node_id import NodeIdentityError, NodeKeyError, stable_node_id
from node.validation import Limits
from node.worker import TaskWorker, WorkerConfig
from proto.process import reap_children
from proto.records import HardwareInfo
from proto.result_signing import ResultSigner

# NodeConfig lived here before node/node_config.py; importers of node.daemon keep working.
__all__ = ["NodeConfig", "NodeDaemon", "run_node"]

logger = logging.getLogger(__name__)

RESULT_KEY_FILE = "result_key.der"  # the node's key: it signs results and DHT records, its id derives from it


def node_signer(state_dir: Path) -> ResultSigner:
    """The node's key (proto/result_signing.py), kept in its state directory across restarts.

    It signs the node's results and, in the DHT, its records; the DHT's peer id derives from it, and
    so does the node's id outside the DHT (:mod:`node.node_id`). A restarted node is the same node to
    brokers and agents: same id, same key, same reputation.
    """
    path = state_dir / RESULT_KEY_FILE
    try:
        return ResultSigner.load_or_create(path)
    except ValueError as exc:  # not a DER RSA private key: never replaced silently, it is the node's identity
        raise NodeKeyError(f"the node's key {path} cannot be read ({exc}); move it away to start as a new node "
                           "(a new id, with no reputation)") from exc


class NodeDaemon:
    """One running node. ``await start()``, then ``await stop()`` (or :meth:`run` for both around signals)."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.hardware: HardwareInfo | None = None
        self.worker: TaskWorker | None = None
        self._stack = EngineStack()
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
        signer = node_signer(state_dir)
        node_id = cfg.node_id or stable_node_id(state_dir, signer.public_key)
        self.hardware = await asyncio.to_thread(
            measure_hardware, weight_format=cfg.weight_format, price_per_hour=cfg.price_per_hour
        )
        logger.info("node %s hardware: %s", node_id, self.hardware.description)
        tokenizer = await asyncio.to_thread(_load_tokenizer, cfg.model)
        max_positions = await self._stack.build(cfg, self.hardware, identity=signer.private_key)
        peer_id = self._stack.dht_peer_id
        if peer_id is not None and not cfg.node_id:
            node_id = peer_id  # the peer id of the node's key, as brokers see it (a legacy id file aside)
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
        engine = self._stack.engine
        if engine is None:
            raise RuntimeError("no engine was built")
        self.worker = TaskWorker(worker_config, engine=engine, tokenizer=tokenizer, ledger=self._ledger,
                                 signer=signer)
        await self.worker.start(self._connection)
        methods = ", ".join(getattr(engine, "methods", ("baseline",)))
        logger.info("node %s ready: model %s as %r, group %s, namespace %s, engine %s running methods: %s",
                    node_id, cfg.model, cfg.model_name, cfg.group, cfg.namespace, cfg.engine, methods)

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
        """Drain the worker, then close the engine (and its serving or presence), the connection and the ledger."""
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
        await self._stack.close()
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


def run_node(config: NodeConfig) -> int:
    """Blocking entry point used by ``dinet-node run``; 2 when the node cannot start under its identity."""
    try:
        return asyncio.run(NodeDaemon(config).run())
    except NodeIdentityError as exc:
        print(f"dinet-node run: error: {exc}", file=sys.stderr)
        return 2
    finally:
        reap_children()
