"""The shared telemetry-publish helper (proto/telemetry.py), without RabbitMQ: the headers nodes and agents
agree on, the kinds it refuses, and what it hands the exchange. The real stream is exercised by
tests/test_agent_outcomes.py and tests/test_node_worker.py, which read these entries back."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import aio_pika
import pytest

from proto import messages_pb2
from proto.telemetry import OUTCOME_REPORT, TIMING_REPORT, entry_kind, entry_message, publish_entry
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

    async def publish(self, message: aio_pika.Message, **kwargs: Any) -> None:
        self.calls.append((message, kwargs))


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
