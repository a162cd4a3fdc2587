"""The shared telemetry-publish helpers (proto/telemetry.py), without RabbitMQ: the headers nodes and agents
agree on, the kinds refused, what is handed to the exchange, and what a failed best-effort publish costs.
The real stream is exercised by tests/test_agent_outcomes.py and tests/test_node_worker.py, which read
these entries back."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import pytest

from proto import messages_pb2
from proto.telemetry import (
    ENTRY_CONFIRM_TIMEOUT_S,
    OUTCOME_REPORT,
    TIMING_REPORT,
    entry_kind,
    entry_message,
    publish_entry,
    publish_entry_best_effort,
)
from proto.topology import Topology


@pytest.mark.parametrize(
    ("entry", "kind", "message_id"),
    [
        (messages_pb2.TimingReport(request_id="r1", node_id="n"), TIMING_REPORT, "r1:report"),
        (messages_pb2.OutcomeReport(request_id="r1", node_id="n"), OUTCOME_REPORT, "r1:outcome"),
    ],
)
def test_an_entry_is_typed_with_its_kind_and_keyed_by_its_request(
    entry: messages_pb2.TimingReport | messages_pb2.OutcomeReport, kind: str, message_id: str
) -> None:
    message = entry_message(entry, app_id="agent-7")
    assert entry_kind(message.type) == kind
    assert (message.message_id, message.correlation_id, message.app_id) == (message_id, "r1", "agent-7")
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert message.timestamp is not None
    assert type(entry).FromString(message.body) == entry
    assert entry_message(entry).app_id is None  # nodes publish without one


@pytest.mark.parametrize(
    "entry", [messages_pb2.RoutingRecord(request_id="r1"), messages_pb2.InferenceResult(request_id="r1")]
)
def test_other_messages_are_refused_before_anything_is_published(entry: Any) -> None:
    with pytest.raises(TypeError, match="not a per-request telemetry entry"):
        entry_message(entry)


@dataclass
class RecordingExchange:
    calls: list[tuple[aio_pika.Message, dict[str, Any]]] = field(default_factory=list)
    fails_with: BaseException | None = None

    async def publish(self, message: aio_pika.Message, **kwargs: Any) -> None:
        self.calls.append((message, kwargs))
        if self.fails_with is not None:
            raise self.fails_with


@dataclass
class FakeChannel:
    default_exchange: RecordingExchange = field(default_factory=RecordingExchange)


async def test_publish_goes_to_the_namespace_stream_mandatory_with_the_callers_timeout() -> None:
    channel = FakeChannel()
    topology = Topology(namespace="dinet-unit")
    await publish_entry(channel, topology, messages_pb2.TimingReport(request_id="a"))  # type: ignore[arg-type]
    await publish_entry(channel, topology, messages_pb2.OutcomeReport(request_id="b"),  # type: ignore[arg-type]
                        app_id="agent", timeout_s=2.5)
    sent = [(m.message_id, m.app_id, kw) for m, kw in channel.default_exchange.calls]
    assert sent == [
        ("a:report", None, {"routing_key": "dinet-unit.telemetry", "mandatory": True, "timeout": None}),
        ("b:outcome", "agent", {"routing_key": "dinet-unit.telemetry", "mandatory": True, "timeout": 2.5}),
    ]


async def test_best_effort_publishing_reports_success_and_bounds_the_confirm_by_default() -> None:
    channel = FakeChannel()
    topology = Topology(namespace="dinet-unit")
    entry = messages_pb2.TimingReport(request_id="a")
    assert await publish_entry_best_effort(channel, topology, entry, app_id="node-1")  # type: ignore[arg-type]
    ((message, kwargs),) = channel.default_exchange.calls
    assert (message.message_id, message.app_id, kwargs["timeout"]) == ("a:report", "node-1", ENTRY_CONFIRM_TIMEOUT_S)


async def test_a_failed_best_effort_publish_is_logged_and_returned_never_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    channel = FakeChannel(RecordingExchange(fails_with=TimeoutError("no confirm")))
    entry = messages_pb2.OutcomeReport(request_id="r9")
    with caplog.at_level(logging.WARNING, logger="proto.telemetry"):
        ok = await publish_entry_best_effort(channel, Topology(namespace="dinet-unit"), entry)  # type: ignore[arg-type]
    assert ok is False
    assert "OutcomeReport of r9" in caplog.text


async def test_cancelling_a_best_effort_publish_still_cancels() -> None:
    channel = FakeChannel(RecordingExchange(fails_with=asyncio.CancelledError()))
    with pytest.raises(asyncio.CancelledError):
        await publish_entry_best_effort(channel, Topology(namespace="dinet-unit"),  # type: ignore[arg-type]
                                        messages_pb2.TimingReport(request_id="c"))
