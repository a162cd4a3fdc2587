"""Test helpers for the node worker and the agent: a running worker, a stand-in broker, reply capture.

The stand-in broker (:class:`Forwarder`) plays the broker's role with nothing but aio-pika:
it consumes the request queues and publishes each request as a ``RoutedTask`` to one
group's queue, so worker and agent tests do not depend on ``broker/``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import pytest
import torch
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from broker.config import ReputationConfig
from node.dedup import CompletedLedger
from node.local_engine import LocalEngine
from node.validation import Limits
from node.worker import TaskWorker, WorkerConfig
from proto import messages_pb2
from proto.result_signing import ResultSigner
from proto.telemetry import TIMING_REPORT, entry_kind
from proto.topology import PRIORITIES, Topology

MODEL_NAME = "tiny"
GROUP = "g1"


@pytest.fixture(scope="session")
def tiny_engine(tiny_model_path: Path):
    """One LocalEngine on the tiny model for the whole session (it holds no per-test state)."""
    engine = LocalEngine.load(str(tiny_model_path), device="cpu")
    yield engine
    engine._executor.shutdown(wait=True)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_path))


def reference_greedy(model_path: Path, prompt: str, max_new_tokens: int) -> list[int]:
    """What ``transformers`` ``generate`` (greedy) produces for ``prompt`` on the model at ``model_path``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    model: Any = AutoModelForCausalLM.from_pretrained(str(model_path))
    model.eval()
    ids = torch.tensor([tokenizer.encode(prompt)])
    with torch.inference_mode():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
    return [int(t) for t in out[0, ids.shape[1]:]]


def make_request(
    topology: Topology,
    reply_to: str,
    *,
    request_id: str,
    prompt: str = "def parse(text):",
    max_new_tokens: int = 8,
    temperature: float = 0.0,
    seed: int | None = None,
    model: str = MODEL_NAME,
    deadline_unix: float = 0.0,
) -> messages_pb2.InferenceRequest:
    return messages_pb2.InferenceRequest(
        request_id=request_id,
        model=model,
        prompt=prompt,
        max_new_tokens=max_new_tokens,
        sampling=messages_pb2.SamplingParams(temperature=temperature, seed=seed or 0, has_seed=seed is not None),
        priority="normal",
        reply_to=reply_to,
        deadline_unix=deadline_unix,
        submitted_at=time.time(),
        agent_id="test",
    )


def routed(request: messages_pb2.InferenceRequest, method: str = "baseline") -> messages_pb2.RoutedTask:
    return messages_pb2.RoutedTask(
        request=request,
        decision=messages_pb2.RoutingDecision(method=method, group=GROUP, scheduler="test", routed_at=time.time()),
    )


async def publish_task(
    connection: AbstractRobustConnection, topology: Topology, body: bytes, *, reply_to: str = "",
    correlation_id: str = "",
) -> None:
    """Publish raw bytes to the test group's queue (declaring it), with a confirm."""
    channel = await connection.channel()
    try:
        queue = await topology.group_queue_spec(GROUP).declare(channel)
        await topology.declare_dead_letters(channel)
        await channel.default_exchange.publish(
            aio_pika.Message(body, reply_to=reply_to or None, correlation_id=correlation_id or None,
                             delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            routing_key=queue.name, mandatory=True,
        )
    finally:
        await channel.close()


@dataclass
class Replies:
    """Everything that arrived on one reply queue, split by kind."""

    chunks: list[messages_pb2.TokenChunk] = field(default_factory=list)
    results: list[messages_pb2.InferenceResult] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def tokens_of(self, request_id: str) -> list[int]:
        out: list[int] = []
        for chunk in self.chunks:
            if chunk.request_id == request_id:
                assert chunk.index == len(out), "chunks arrive in order and without gaps"
                out.extend(chunk.token_ids)
        return out

    def result_of(self, request_id: str) -> messages_pb2.InferenceResult:
        matches = [r for r in self.results if r.request_id == request_id]
        assert len(matches) == 1, f"expected one result for {request_id}, got {len(matches)}"
        return matches[0]

    async def wait_results(self, n: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.results) < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"got {len(self.results)} of {n} results")
            self.arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.arrived.wait(), timeout=remaining)


@contextlib.asynccontextmanager
async def reply_queue(connection: AbstractRobustConnection, topology: Topology, agent_id: str = "test"
                      ) -> AsyncIterator[tuple[str, Replies]]:
    """Declare an agent-style reply queue and collect what arrives on it."""
    channel = await connection.channel()
    queue = await topology.reply_queue_spec(agent_id).declare(channel)
    replies = Replies()

    async def on_message(message: AbstractIncomingMessage) -> None:
        if message.type == "TokenChunk":
            replies.chunks.append(messages_pb2.TokenChunk.FromString(message.body))
        else:
            replies.results.append(messages_pb2.InferenceResult.FromString(message.body))
        replies.arrived.set()
        await message.ack()

    tag = await queue.consume(on_message)
    try:
        yield queue.name, replies
    finally:
        with contextlib.suppress(Exception):
            await queue.cancel(tag)
        await channel.close()


@contextlib.asynccontextmanager
async def running_worker(
    connection: AbstractRobustConnection,
    topology: Topology,
    engine: Any,
    tokenizer: Any,
    *,
    state_dir: Path | None = None,
    node_id: str = "node-a",
    telemetry_lookback_s: float = 0.0,
    prefetch: int = 4,
    max_positions: int = 1024,
    reputation: ReputationConfig | None = None,
    fence_check_s: float = 2.0,
    signer: ResultSigner | None = None,
) -> AsyncIterator[TaskWorker]:
    ledger = CompletedLedger(state_dir) if state_dir is not None else None
    config = WorkerConfig(
        node_id=node_id,
        group=GROUP,
        limits=Limits(model_name=MODEL_NAME, max_new_tokens=512, max_positions=max_positions),
        namespace=topology.namespace,
        prefetch=prefetch,
        telemetry_lookback_s=telemetry_lookback_s,
        drain_grace_s=5.0,
        reputation=reputation or ReputationConfig(),
        fence_check_s=fence_check_s,
    )
    worker = TaskWorker(config, engine=engine, tokenizer=tokenizer, ledger=ledger, signer=signer)
    await worker.start(connection)
    try:
        yield worker
    finally:
        await worker.close()
        if ledger is not None:
            ledger.close()


class Forwarder:
    """The broker's role in miniature: request queues -> RoutedTask on one group's queue, ack after confirm."""

    def __init__(self, topology: Topology, group: str = GROUP) -> None:
        self.topology = topology
        self.group = group
        self.forwarded = 0

    async def start(self, connection: AbstractRobustConnection) -> None:
        self._channel = await connection.channel()
        await self.topology.declare_core(self._channel, groups=(self.group,))
        self._out = await connection.channel(publisher_confirms=True, on_return_raises=True)
        for priority in PRIORITIES:
            queue = await self.topology.request_queue_spec(priority).declare(self._channel)
            await queue.consume(self._on_request)

    async def _on_request(self, message: AbstractIncomingMessage) -> None:
        request = messages_pb2.InferenceRequest.FromString(message.body)
        task = routed(request)
        await self._out.default_exchange.publish(
            aio_pika.Message(task.SerializeToString(), reply_to=request.reply_to, correlation_id=request.request_id,
                             delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            routing_key=self.topology.group_queue(self.group), mandatory=True,
        )
        self.forwarded += 1
        await message.ack()

    async def close(self) -> None:
        for channel in (self._channel, self._out):
            with contextlib.suppress(Exception):
                await channel.close()


async def read_telemetry(connection: AbstractRobustConnection, topology: Topology, *, expect: int,
                         timeout: float = 10.0) -> list[messages_pb2.TimingReport]:
    """Replay the telemetry stream from its start until ``expect`` nodes' reports were read (other kinds skipped)."""
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=100)
    queue = await topology.telemetry_spec().declare(channel)
    reports: list[messages_pb2.TimingReport] = []
    enough = asyncio.Event()

    async def on_message(message: AbstractIncomingMessage) -> None:
        if entry_kind(message.type) == TIMING_REPORT:  # not the agents' outcomes or brokers' records
            reports.append(messages_pb2.TimingReport.FromString(message.body))
        await message.ack()
        if len(reports) >= expect:
            enough.set()

    await queue.consume(on_message, arguments={"x-stream-offset": "first"})
    try:
        await asyncio.wait_for(enough.wait(), timeout)
    finally:
        await channel.close()
    return reports
