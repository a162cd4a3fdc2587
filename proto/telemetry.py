"""Entries on the telemetry stream: their kinds (the AMQP ``type`` property) and how one is appended.

Three parties write to ``<namespace>.telemetry``:

- a node, after each task: ``TimingReport`` (its own timings; a meta-training row);
- the broker that routed a request, before its task: ``RoutingRecord`` (the prediction), or the
  records of one event-loop turn together as a ``RoutingRecordBatch``;
- the agent, after each request: ``OutcomeReport`` (what the customer saw).

Every reader asks :func:`entry_kind` first and skips kinds it does not handle, so a new
kind never reaches an old parser. An entry without a ``type`` is a ``TimingReport``:
that is what nodes wrote before the header was read by anyone.

Nodes and agents append their per-request entries with :func:`publish_entry_best_effort`
(over :func:`publish_entry`), so the two agree by construction on the headers (kind,
``<request_id>:<suffix>`` message id, persistence), on how long a confirm may take, and on
what a failure costs: a log line, never the request it follows.
Brokers publish their batches with ``broker.amqp.publish`` instead: it skips
``aio_pika.Message`` for speed, on a path that runs once per routed request.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import TYPE_CHECKING

import aio_pika

from proto import messages_pb2

if TYPE_CHECKING:
    from aio_pika.abc import AbstractChannel

    from proto.topology import Topology

logger = logging.getLogger(__name__)

ENTRY_CONFIRM_TIMEOUT_S = 5.0  # a per-request entry's publisher confirm; longer is a broker in trouble

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
# Per-request entries get the message id "<request_id>:<suffix>", one suffix per kind, so a
# node's report and an agent's outcome for the same request never share an id.
MESSAGE_ID_SUFFIX = {TIMING_REPORT: "report", OUTCOME_REPORT: "outcome"}

RequestEntry = messages_pb2.TimingReport | messages_pb2.OutcomeReport


def entry_kind(message_type: str | None) -> str:
    """The kind of a stream entry from its AMQP ``type`` (missing -> ``TimingReport``).

    Returns the header unchanged when it names no known kind, so callers can log it and skip.
    """
    if not message_type:
        return TIMING_REPORT
    return _FULL_NAMES.get(message_type, message_type)


def entry_message(entry: RequestEntry, *, app_id: str | None = None) -> aio_pika.Message:
    """The persistent AMQP message for one per-request entry, typed with its kind.

    :raises TypeError: ``entry`` is not a kind that nodes or agents append (a routing record
        or any other message would reach readers under a wrong or unknown kind).
    """
    kind = entry.DESCRIPTOR.name
    suffix = MESSAGE_ID_SUFFIX.get(kind)
    if suffix is None:
        raise TypeError(f"{kind} is not a per-request telemetry entry; expected one of {sorted(MESSAGE_ID_SUFFIX)}")
    return aio_pika.Message(
        entry.SerializeToString(),
        type=kind,
        message_id=f"{entry.request_id}:{suffix}",
        correlation_id=entry.request_id,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        timestamp=dt.datetime.now(dt.UTC),
        app_id=app_id,
    )


async def publish_entry(
    channel: AbstractChannel,
    topology: Topology,
    entry: RequestEntry,
    *,
    app_id: str | None = None,
    timeout_s: float | None = None,
) -> None:
    """Append ``entry`` to the telemetry stream, mandatory; returns once RabbitMQ confirmed it
    (on a channel with publisher confirms).

    Errors are aio_pika's and propagate: both callers treat telemetry as best effort and
    decide themselves what a failure costs (log it, count it).

    :raises TypeError: see :func:`entry_message`.
    """
    await channel.default_exchange.publish(
        entry_message(entry, app_id=app_id),
        routing_key=topology.telemetry_stream,
        mandatory=True,
        timeout=timeout_s,
    )


async def publish_entry_best_effort(
    channel: AbstractChannel,
    topology: Topology,
    entry: RequestEntry,
    *,
    app_id: str | None = None,
    timeout_s: float = ENTRY_CONFIRM_TIMEOUT_S,
) -> bool:
    """:func:`publish_entry`, for the entries that follow a request already answered: a failure (no
    confirm within ``timeout_s``, a returned message, a closed channel) is logged and returns False.

    Why best effort: a node's report and an agent's outcome come after the answer was delivered; losing
    one costs a meta-training row or one piece of reputation evidence, while raising would fail (or, for
    a node, hold the task slot of) a request that succeeded. Cancellation still propagates.
    """
    try:
        await publish_entry(channel, topology, entry, app_id=app_id, timeout_s=timeout_s)
    except Exception as exc:
        logger.warning("could not append the %s of %s to the telemetry stream (%r)",
                       entry.DESCRIPTOR.name, entry.request_id, exc)
        return False
    return True
