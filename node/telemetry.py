"""The node's side of the telemetry stream: building ``TimingReport`` rows and replaying recent ones.

Every finished task (answered or failed with a typed error) becomes one ``TimingReport``
on ``<namespace>.telemetry``: a row of the scheduler's meta-training set. It does not
move the node's reputation (brokers judge nodes on what agents report, see
broker/reputation.py). A node also *reads* the stream's recent past at start-up and
keeps following it, so it learns which requests any node already answered (see
:mod:`node.dedup`); only ``TimingReport`` entries count for that, never the brokers'
routing records (published *before* a task) or the agents' outcomes.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection
from google.protobuf.message import DecodeError

from node.dedup import RecentIds
from proto import common_pb2, messages_pb2
from proto.common_pb2 import ErrorCode
from proto.records import HardwareInfo
from proto.telemetry import TIMING_REPORT, entry_kind
from proto.topology import Topology

logger = logging.getLogger(__name__)

TASK_TEXT_CHARS = 256  # prompt prefix kept in a report for the scheduler's LM embedding


def hardware_profile(hw: HardwareInfo) -> common_pb2.HardwareProfile:
    return common_pb2.HardwareProfile(**hw.to_dict())


def shared_prefix_ratio(prompt_ids: tuple[int, ...], recent: list[tuple[int, ...]]) -> float:
    """Longest common token prefix with any recent prompt, as a fraction of this prompt."""
    if not prompt_ids:
        return 0.0
    best = 0
    for other in recent:
        n = 0
        for a, b in zip(prompt_ids, other, strict=False):
            if a != b:
                break
            n += 1
        best = max(best, n)
    return best / len(prompt_ids)


def build_report(
    *,
    routed: messages_pb2.RoutedTask,
    result: messages_pb2.InferenceResult,
    hardware: HardwareInfo,
    shared_prefix: float,
    concurrency: int,
) -> messages_pb2.TimingReport:
    """The telemetry row for one answered task (ok or a typed error)."""
    request = routed.request
    return messages_pb2.TimingReport(
        request_id=request.request_id,
        node_id=result.node_id,
        group=result.group,
        model=request.model,
        method=result.method,
        ok=result.ok,
        error_code=result.error.code if not result.ok else ErrorCode.ERROR_CODE_UNSPECIFIED,
        timing=result.timing,
        max_new_tokens=request.max_new_tokens,
        shared_prefix_ratio=shared_prefix,
        concurrency_at_arrival=concurrency,
        task_text=request.prompt[:TASK_TEXT_CHARS],
        hardware=hardware_profile(hardware),
        decision=routed.decision,
        finished_at=time.time(),
    )


class TelemetryTail:
    """Follows the telemetry stream from ``lookback_s`` ago and remembers answered request ids.

    Only reports published by nodes count (``broker_reported`` empty): a node publishes its
    report after the final result, so its presence proves the agent was answered.
    """

    def __init__(self, topology: Topology, *, lookback_s: float, max_entries: int = 200_000) -> None:
        self._topology = topology
        self._lookback_s = lookback_s
        self.answered = RecentIds(max_entries)
        self._channel: AbstractChannel | None = None
        self._last_message_at = 0.0
        self._started_at = 0.0
        self._caught_up = asyncio.Event()

    async def start(self, connection: AbstractRobustConnection) -> None:
        self._started_at = time.time()
        self._last_message_at = time.monotonic()
        self._channel = await connection.channel()
        await self._channel.set_qos(prefetch_count=500)  # streams need a prefetch to deliver
        queue = await self._topology.telemetry_spec().declare(self._channel)
        since = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=self._lookback_s)
        await queue.consume(self._on_message, arguments={"x-stream-offset": since})

    async def wait_caught_up(self, *, idle_s: float = 0.3, max_wait_s: float = 10.0) -> None:
        """Return once the replay reached the present (a report newer than our start arrived,
        or the stream stayed quiet for ``idle_s``), or after ``max_wait_s`` at most."""
        deadline = time.monotonic() + max_wait_s
        while not self._caught_up.is_set() and time.monotonic() < deadline:
            if time.monotonic() - self._last_message_at >= idle_s:
                break
            try:
                await asyncio.wait_for(self._caught_up.wait(), timeout=0.05)
            except TimeoutError:
                continue
        logger.info("telemetry replay: %d answered request ids known", len(self.answered))

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        self._last_message_at = time.monotonic()
        report = None
        if entry_kind(message.type) == TIMING_REPORT:
            try:
                report = messages_pb2.TimingReport.FromString(message.body)
            except DecodeError:
                report = None
        if report is not None and report.request_id and not report.broker_reported:
            self.answered.add(report.request_id, report.finished_at or None)
            if report.finished_at >= self._started_at:
                self._caught_up.set()
        await message.ack()

    async def close(self) -> None:
        if self._channel is not None and not self._channel.is_closed:
            await self._channel.close()
        self._channel = None

