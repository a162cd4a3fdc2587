"""Kinds of entries on the telemetry stream, told apart by the AMQP ``type`` property.

Three parties write to ``<namespace>.telemetry``:

- a node, after each task: ``TimingReport`` (its own timings; a meta-training row);
- the broker that routed a request, before its task: ``RoutingRecord`` (the prediction), or the
  records of one event-loop turn together as a ``RoutingRecordBatch``;
- the agent, after each request: ``OutcomeReport`` (what the customer saw).

Every reader asks :func:`entry_kind` first and skips kinds it does not handle, so a new
kind never reaches an old parser. An entry without a ``type`` is a ``TimingReport``:
that is what nodes wrote before the header was read by anyone.
"""

from __future__ import annotations

from proto import messages_pb2

TIMING_REPORT = messages_pb2.TimingReport.DESCRIPTOR.name
OUTCOME_REPORT = messages_pb2.OutcomeReport.DESCRIPTOR.name
ROUTING_RECORD = messages_pb2.RoutingRecord.DESCRIPTOR.name
ROUTING_RECORD_BATCH = messages_pb2.RoutingRecordBatch.DESCRIPTOR.name
KINDS = frozenset({TIMING_REPORT, OUTCOME_REPORT, ROUTING_RECORD, ROUTING_RECORD_BATCH})
_FULL_NAMES = {
    messages_pb2.TimingReport.DESCRIPTOR.full_name: TIMING_REPORT,
    messages_pb2.OutcomeReport.DESCRIPTOR.full_name: OUTCOME_REPORT,
    messages_pb2.RoutingRecord.DESCRIPTOR.full_name: ROUTING_RECORD,
    messages_pb2.RoutingRecordBatch.DESCRIPTOR.full_name: ROUTING_RECORD_BATCH,
}


def entry_kind(message_type: str | None) -> str:
    """The kind of a stream entry from its AMQP ``type`` (missing -> ``TimingReport``).

    Returns the header unchanged when it names no known kind, so callers can log it and skip.
    """
    if not message_type:
        return TIMING_REPORT
    return _FULL_NAMES.get(message_type, message_type)
