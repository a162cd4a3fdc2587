"""Routing records travel in batches, one stream entry per loop turn, and are judged one by one."""

from __future__ import annotations

import asyncio

import pytest

from broker.reputation import ReputationLedger
from broker.route_records import RouteRecorder
from broker.telemetry import TelemetryConsumer
from proto import messages_pb2
from proto.telemetry import OUTCOME_REPORT, ROUTING_RECORD_BATCH
from proto.topology import Topology
from tests.helpers_reputation import outcome_proto, record_proto

T0 = 1.7e9


class Stream:
    """Stands in for the confirmed publish: keeps each entry, or fails as RabbitMQ would."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.entries: list[tuple[bytes, str]] = []
        self.fail = fail

    async def publish(self, body: bytes, message_id: str) -> None:
        await asyncio.sleep(0)  # a confirm takes a loop turn at least
        if self.fail is not None:
            raise self.fail
        self.entries.append((body, message_id))


def batch_records(body: bytes) -> list[str]:
    return [r.request_id for r in messages_pb2.RoutingRecordBatch.FromString(body).records]


async def test_the_records_of_one_window_become_one_entry_and_every_request_waits_for_it() -> None:
    stream = Stream()
    recorder = RouteRecorder(stream.publish, broker_id="b1", window_s=0.05)
    done: list[str] = []

    async def route(rid: str) -> None:
        await recorder.record(record_proto(rid, group="g", at=T0))
        done.append(rid)

    first = asyncio.ensure_future(route("r0"))
    await asyncio.sleep(0.01)  # within the window: the next ones join r0's entry
    assert not done and not stream.entries
    await asyncio.gather(first, *(route(f"r{i}") for i in range(1, 5)))
    assert [batch_records(body) for body, _ in stream.entries] == [[f"r{i}" for i in range(5)]]
    assert stream.entries[0][1] == "routes:b1:1" and sorted(done) == [f"r{i}" for i in range(5)]
    await recorder.record(record_proto("later", group="g", at=T0))  # a later window: a new entry
    assert [batch_records(body) for body, _ in stream.entries][1:] == [["later"]]
    assert (recorder.batches, recorder.records) == (2, 6)


async def test_a_full_batch_goes_out_without_waiting_for_the_window_to_end() -> None:
    stream = Stream()
    recorder = RouteRecorder(stream.publish, broker_id="b1", max_batch=2, window_s=1.0)
    waiting = [asyncio.ensure_future(recorder.record(record_proto(f"r{i}", group="g", at=T0))) for i in range(5)]
    await asyncio.sleep(0.05)  # far less than the window: only the full entries are out
    assert [batch_records(body) for body, _ in stream.entries] == [["r0", "r1"], ["r2", "r3"]]
    assert [w.done() for w in waiting] == [True, True, True, True, False]
    await recorder.close()  # sends the rest at once
    assert batch_records(stream.entries[-1][0]) == ["r4"] and waiting[4].done()


async def test_a_failed_publish_reaches_every_request_of_the_batch() -> None:
    recorder = RouteRecorder(Stream(fail=ConnectionError("gone")).publish, broker_id="b1")
    results = await asyncio.gather(*(recorder.record(record_proto(f"r{i}", group="g", at=T0)) for i in range(3)),
                                   return_exceptions=True)
    assert all(isinstance(r, ConnectionError) for r in results)
    assert recorder.batches == 0


def test_a_batch_needs_room_for_a_record_and_a_sane_window() -> None:
    with pytest.raises(ValueError, match="max_batch"):
        RouteRecorder(Stream().publish, broker_id="b1", max_batch=0)
    with pytest.raises(ValueError, match="window_s"):
        RouteRecorder(Stream().publish, broker_id="b1", window_s=-1)


async def test_with_no_window_the_records_of_one_loop_turn_travel_together() -> None:
    stream = Stream()
    recorder = RouteRecorder(stream.publish, broker_id="b1", window_s=0)
    await asyncio.gather(*(recorder.record(record_proto(f"r{i}", group="g", at=T0)) for i in range(3)))
    assert [batch_records(body) for body, _ in stream.entries] == [["r0", "r1", "r2"]]


def test_each_record_of_a_batch_is_judged_and_a_bad_one_is_skipped_alone() -> None:
    consumer = TelemetryConsumer(Topology("unit"), ReputationLedger(), [])
    bad = record_proto("bad", group="g", at=float("nan"))  # not a plausible routing time
    batch = messages_pb2.RoutingRecordBatch(records=[
        record_proto("r1", group="g", at=T0), bad, record_proto("r2", group="g", at=T0 + 1),
    ])
    consumer.handle(batch.SerializeToString(), 1, ROUTING_RECORD_BATCH)
    for offset, rid in enumerate(("r1", "r2", "bad"), start=2):
        consumer.handle(outcome_proto(rid, "n1", group="g", ok=False, code=0).SerializeToString(), offset,
                        OUTCOME_REPORT)
    assert consumer.malformed >= 1  # the bad record (its outcome then matches nothing and is ignored)
    (row,) = consumer.ledger.table(T0 + 2)
    assert row.node_id == "n1" and row.reports == 2  # r1 and r2 judged, "bad" not


def test_an_unparsable_batch_is_counted_and_skipped() -> None:
    consumer = TelemetryConsumer(Topology("unit"), ReputationLedger(), [])
    consumer.handle(b"\xff\xff\xff", 1, ROUTING_RECORD_BATCH)
    assert consumer.malformed == 1 and consumer.received == 0
