"""Test doubles around a real broker: an agent emulator, a stub consumer group, dead-letter reading.

The agent emulator is a plain aio-pika client (publish with confirms and retries,
results deduplicated by request_id) so broker tests do not depend on the agent package.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from aiormq.exceptions import AMQPError, ChannelInvalidStateError
from google.protobuf.message import Message

from proto import messages_pb2
from proto.common_pb2 import ErrorCode
from proto.result_signing import ResultSigner
from proto.topology import PRIORITIES, Topology

ROOT = Path(__file__).resolve().parent.parent
TRANSPORT = (AMQPError, ConnectionError, ChannelInvalidStateError, asyncio.TimeoutError)


def make_request(
    topology: Topology, agent_id: str, *, model: str = "tiny", prompt: str = "hello world",
    max_new_tokens: int = 8, priority: str = "normal", **fields: Any,
) -> messages_pb2.InferenceRequest:
    return messages_pb2.InferenceRequest(
        request_id=fields.pop("request_id", uuid.uuid4().hex),
        model=model, prompt=prompt, max_new_tokens=max_new_tokens, priority=priority,
        reply_to=fields.pop("reply_to", topology.reply_queue(agent_id)),
        agent_id=agent_id, submitted_at=time.time(), **fields,
    )


async def publish_confirmed(
    channel: aio_pika.abc.AbstractChannel, body: bytes, routing_key: str, *, attempts: int = 60, **props: Any
) -> None:
    """Publish with a confirm, retrying through connection trouble (like a real agent)."""
    for attempt in range(attempts):
        try:
            await channel.default_exchange.publish(
                aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT, **props),
                routing_key=routing_key, mandatory=True, timeout=10,
            )
            return
        except TRANSPORT:
            if attempt == attempts - 1:
                raise
            await asyncio.sleep(0.5)


@dataclass
class AgentEmu:
    """Publishes requests and collects results on its durable reply queue, deduplicated by request_id."""

    url: str
    topology: Topology
    agent_id: str = field(default_factory=lambda: "agent-" + uuid.uuid4().hex[:8])
    results: dict[str, messages_pb2.InferenceResult] = field(default_factory=dict)
    duplicates: int = 0
    connection: AbstractRobustConnection | None = None

    async def __aenter__(self) -> AgentEmu:
        self.connection = await aio_pika.connect_robust(self.url)
        self.channel = await self.connection.channel()
        await self.topology.declare_core(self.channel)
        consume_channel = await self.connection.channel()
        await consume_channel.set_qos(prefetch_count=256)
        queue = await self.topology.reply_queue_spec(self.agent_id).declare(consume_channel)
        await queue.consume(self._on_result)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.connection is not None:
            await self.connection.close()

    @property
    def reply_to(self) -> str:
        return self.topology.reply_queue(self.agent_id)

    def request(self, **fields: Any) -> messages_pb2.InferenceRequest:
        return make_request(self.topology, self.agent_id, **fields)

    async def submit(self, request: messages_pb2.InferenceRequest, priority: str | None = None) -> str:
        if priority is None:
            priority = request.priority if request.priority in PRIORITIES else "normal"
        queue = self.topology.request_queue(priority)
        await publish_confirmed(self.channel, request.SerializeToString(), queue, message_id=request.request_id,
                                reply_to=self.reply_to)
        return request.request_id

    async def submit_raw(self, body: bytes, *, priority: str = "normal", **props: Any) -> None:
        await publish_confirmed(self.channel, body, self.topology.request_queue(priority), **props)

    async def _on_result(self, message: AbstractIncomingMessage) -> None:
        result = messages_pb2.InferenceResult.FromString(message.body)
        if result.request_id in self.results:
            self.duplicates += 1
        else:
            self.results[result.request_id] = result
        with contextlib.suppress(*TRANSPORT):
            await message.ack()

    async def wait_for(self, request_ids: Any, timeout: float = 30.0) -> dict[str, messages_pb2.InferenceResult]:
        wanted = set(request_ids)
        deadline = time.monotonic() + timeout
        while not wanted <= self.results.keys():
            if time.monotonic() > deadline:
                missing = wanted - self.results.keys()
                raise AssertionError(f"{len(missing)} of {len(wanted)} results missing, e.g. {sorted(missing)[:3]}")
            await asyncio.sleep(0.05)
        return {rid: self.results[rid] for rid in wanted}


Behaviour = Callable[[messages_pb2.RoutedTask], "tuple[bool, int, float]"]  # -> ok, error code, delay s


def behave_ok(task: messages_pb2.RoutedTask) -> tuple[bool, int, float]:
    return True, 0, 0.0


@dataclass
class StubGroup:
    """Consumes one group queue as ``node_id``: answers each task and (optionally) reports to telemetry.

    ``lie``: its TimingReports claim success at 1000 tokens/s whatever it did (reputation must not care).
    ``with_tokens``: answers carry ``max_new_tokens`` token ids, so an agent can measure a rate.
    ``signer``: signs its results as a real node does (default: the process-wide key; ``sign=False``: unsigned).
    """

    url: str
    topology: Topology
    group: str
    node_id: str = "stub-node"
    behaviour: Behaviour = behave_ok
    report: bool = False
    lie: bool = False
    with_tokens: bool = False
    prefetch: int = 64
    signer: ResultSigner | None = None
    sign: bool = True
    tasks: list[messages_pb2.RoutedTask] = field(default_factory=list)
    connection: AbstractRobustConnection | None = None

    async def __aenter__(self) -> StubGroup:
        self.connection = await aio_pika.connect_robust(self.url)
        self.publish_channel = await self.connection.channel()
        channel = await self.connection.channel()
        await channel.set_qos(prefetch_count=self.prefetch)
        await self.topology.telemetry_spec().declare(channel)
        queue = await self.topology.group_queue_spec(self.group).declare(channel)
        await queue.consume(self._on_task)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.connection is not None:
            await self.connection.close()

    async def _on_task(self, message: AbstractIncomingMessage) -> None:
        task = messages_pb2.RoutedTask.FromString(message.body)
        ok, code, delay = self.behaviour(task)
        if delay:
            await asyncio.sleep(delay)
        request = task.request
        tokens = max(1, request.max_new_tokens)
        result = messages_pb2.InferenceResult(
            request_id=request.request_id, ok=ok, node_id=self.node_id, group=self.group,
            method=task.decision.method, text="echo:" + request.prompt if ok else "",
            finish_reason="length" if ok else "error",
            token_ids=range(tokens) if ok and self.with_tokens else (),
        )
        if not ok:
            result.error.code = code  # type: ignore[assignment]
            result.error.message = "stub failure"
        if self.sign:
            (self.signer or ResultSigner.process_wide()).sign(result)
        try:
            await publish_confirmed(self.publish_channel, result.SerializeToString(), request.reply_to, attempts=3)
            if self.report:
                total = delay or 0.01
                rate = 1000.0 if self.lie else tokens / total
                report = messages_pb2.TimingReport(
                    request_id=request.request_id, node_id=self.node_id, group=self.group, model=request.model,
                    method=task.decision.method, ok=ok or self.lie,
                    error_code=0 if self.lie else code,  # type: ignore[arg-type]
                    decision=task.decision, finished_at=time.time(),
                    timing=messages_pb2.Timing(new_tokens=tokens, total_s=total, tokens_per_s=rate),
                )
                await publish_confirmed(self.publish_channel, report.SerializeToString(),
                                        self.topology.telemetry_stream, attempts=3, type="TimingReport")
            await message.ack()
        except TRANSPORT:
            return  # redelivered after the reconnect
        self.tasks.append(task)


async def drain_queue(url: str, name: str, *, settle_s: float = 0.3) -> list[AbstractIncomingMessage]:
    """All messages currently in ``name`` (consumed and acked)."""
    connection = await aio_pika.connect(url)
    out: list[AbstractIncomingMessage] = []
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(name, passive=True)
        idle_since = time.monotonic()
        while time.monotonic() - idle_since < settle_s:
            message = await queue.get(fail=False, no_ack=True)
            if message is None:
                await asyncio.sleep(0.05)
                continue
            out.append(message)
            idle_since = time.monotonic()
    finally:
        await connection.close()
    return out


async def publish_report(url: str, topology: Topology, *entries: Message) -> None:
    """Append telemetry entries (TimingReport, RoutingRecord, OutcomeReport), each typed by its message name."""
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        await topology.telemetry_spec().declare(channel)
        for entry in entries:
            await publish_confirmed(channel, entry.SerializeToString(), topology.telemetry_stream,
                                    type=entry.DESCRIPTOR.name)
    finally:
        await connection.close()


def error_name(result: messages_pb2.InferenceResult) -> str:
    return str(ErrorCode.Name(result.error.code))


class BrokerProcess:
    """`python -m broker run` as a subprocess (its log goes to a file under tmp_path)."""

    def __init__(self, url: str, topology: Topology, log_path: Path, *args: str) -> None:
        cmd = [sys.executable, "-m", "broker", "--log-level", "WARNING", "run", "--amqp-url", url,
               "--namespace", topology.namespace, *args]
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._log, cwd=ROOT, env=env)

    async def ready(self, timeout: float = 60.0) -> None:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(self.proc.stdout.readline), timeout)
        if b"ready" not in line:
            raise AssertionError(f"broker did not start: {line!r}\n{self.log_path.read_text()[-3000:]}")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
