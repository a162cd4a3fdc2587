"""Consumes the telemetry stream from its start: evidence to the reputation ledger, timings to the sinks.

The stream (``<namespace>.telemetry``) is the reputation ledger and the meta-training
set: every broker reads it from ``x-stream-offset: first``, so a restarted broker
rebuilds the same reputation table. Entries are told apart by their AMQP ``type``
(:mod:`proto.telemetry`): a node's ``TimingReport`` goes to the sinks (the scheduler's
meta-training set) only; a broker's ``RoutingRecord`` and an agent's ``OutcomeReport``
go to the :class:`ReputationLedger`, after :mod:`broker.evidence` has checked every
field (a bad one is logged and skipped; nothing a writer sends stops the consumer).
Unknown kinds are skipped, so a newer writer never confuses this reader.

The consume arguments are kept in one dict whose offset advances with every message,
so when the robust connection restores the consumer after a RabbitMQ restart it
resumes after the last entry instead of replaying (and double counting) the whole
stream; an entry at an offset already seen is skipped as well.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from google.protobuf.message import DecodeError

from broker.amqp import safe_ack
from broker.evidence import EvidenceError, parse_outcome, parse_route, parse_route_batch, route_of
from broker.policies import TelemetrySink
from broker.reputation import ReputationLedger
from proto import messages_pb2
from proto.telemetry import OUTCOME_REPORT, ROUTING_RECORD, ROUTING_RECORD_BATCH, TIMING_REPORT, entry_kind
from proto.topology import Topology

logger = logging.getLogger(__name__)


class TelemetryConsumer:
    """Stream consumer feeding :class:`ReputationLedger` and optional sinks (e.g. an online learner).

    ``received`` counts entries of a known kind that parsed; ``malformed`` the ones that did not (or
    failed the evidence checks); ``skipped`` entries of a kind this reader does not know.
    """

    def __init__(
        self,
        topology: Topology,
        ledger: ReputationLedger,
        sinks: Sequence[TelemetrySink] = (),
        *,
        prefetch: int = 256,
    ) -> None:
        self.topology = topology
        self.ledger = ledger
        self.sinks = list(sinks)
        self.prefetch = prefetch
        self.last_offset: int | None = None
        self.received = 0
        self.malformed = 0
        self.skipped = 0
        self._arguments: dict[str, Any] = {"x-stream-offset": "first"}
        self._last_message_at = time.monotonic()

    async def start(self, channel: AbstractChannel) -> None:
        await channel.set_qos(prefetch_count=self.prefetch)  # streams require a prefetch
        queue = await self.topology.telemetry_spec().declare(channel)
        self._last_message_at = time.monotonic()
        await queue.consume(self._on_message, arguments=self._arguments)

    def handle(self, body: bytes, offset: int | None, message_type: str | None = None) -> None:
        """Fold one stream entry in (synchronously, so entries are applied in stream order)."""
        if offset is not None and self.last_offset is not None and offset <= self.last_offset:
            return  # replayed after a consumer restore: already counted
        if offset is not None:
            self.last_offset = offset
            self._arguments["x-stream-offset"] = offset + 1
        kind = entry_kind(message_type)
        try:
            if kind == TIMING_REPORT:
                self._timing(body, offset)
            elif kind == ROUTING_RECORD:
                self.ledger.record_route(parse_route(body))
            elif kind == ROUTING_RECORD_BATCH:
                self._routes(parse_route_batch(body), offset)
            elif kind == OUTCOME_REPORT:
                self.ledger.judge(parse_outcome(body))
            else:
                self.skipped += 1
                logger.debug("skipping a telemetry entry of unknown type %r at offset %s", kind, offset)
                return
        except (EvidenceError, DecodeError, ValueError) as exc:
            self.malformed += 1
            logger.warning("skipping a bad %s at telemetry offset %s: %s", kind, offset, exc)
            return
        self.received += 1

    def _routes(self, records: list[messages_pb2.RoutingRecord], offset: int | None) -> None:
        """A broker's records of one loop turn: each is checked and recorded on its own, a bad one skipped alone."""
        for record in records:
            try:
                self.ledger.record_route(route_of(record))
            except EvidenceError as exc:
                self.malformed += 1
                logger.warning("skipping a bad routing record in the batch at telemetry offset %s: %s", offset, exc)

    def _timing(self, body: bytes, offset: int | None) -> None:
        """A node's own report: a meta-training row for the sinks; it never moves reputation."""
        report = messages_pb2.TimingReport()
        report.ParseFromString(body)
        for sink in self.sinks:
            try:
                sink.observe(report)
            except Exception:
                logger.exception("telemetry sink %r failed on report %s", sink, report.request_id)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        self._last_message_at = time.monotonic()
        raw = (message.headers or {}).get("x-stream-offset")
        offset = int(raw) if isinstance(raw, int) else None
        self.handle(message.body, offset, message.type)
        await safe_ack(message)

    async def wait_caught_up(self, *, idle_s: float = 0.3, timeout_s: float = 10.0) -> bool:
        """Wait until the replay goes quiet for ``idle_s`` (at most ``timeout_s``): the table is then current."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if time.monotonic() - self._last_message_at >= idle_s:
                return True
            await asyncio.sleep(idle_s / 3)
        return False
