"""Settling deliveries in batches: one ``basic.ack(multiple=True)`` for a run of finished requests.

Acks are half of the broker's AMQP frames (and of RabbitMQ's work on the request
queues). A :class:`Settler` per consuming channel remembers which delivery tags are
finished and, once per event-loop turn, acks the longest contiguous run with a single
multiple-ack. A tag is acked only after the caller said so (i.e. after its routed
publish was confirmed); rejects are sent at once, one by one. Every delivery must be
settled exactly once, or the run stalls at it: the service guarantees that.

Order on the wire matters, and aiormq does not keep it across tasks: its write queue is
bounded, and under load a frame put by a newer task can overtake one whose ``put`` is still
waiting for room. A multiple-ack for tag 2800 that overtakes one for 2750 makes RabbitMQ see
2750 as unknown and close the channel (every unacked request on it is redelivered, and the
group consumers see duplicates); a multiple-ack that overtakes a requeueing reject acks the
rejected message, i.e. loses it. So each channel has at most one ack write in flight, and a
rejected tag joins the run only once its reject has been written.
"""

from __future__ import annotations

import asyncio
import logging
import weakref

from aiormq.abc import AbstractChannel

from broker.amqp import TRANSPORT_ERRORS
from broker.consumer import Delivery

logger = logging.getLogger(__name__)


class _ChannelRun:
    """Finished tags of one AMQP channel (tags start at 1 and grow by one per delivery)."""

    __slots__ = ("ack_to", "acked_upto", "channel", "finished", "low", "scheduled", "writing")

    def __init__(self, channel: AbstractChannel) -> None:
        self.channel = channel
        self.low = 1  # lowest tag not yet finished
        self.finished: dict[int, bool] = {}  # tag -> True: ack it, False: already rejected
        self.ack_to = 0  # highest tag that may be acked (all tags up to it are finished)
        self.acked_upto = 0  # highest tag whose multiple-ack was handed to aiormq
        self.scheduled = False
        self.writing = False  # a multiple-ack is on its way: the next one waits for it


class Settler:
    """Batches acks per channel; ``ack``/``reject`` each delivery exactly once."""

    def __init__(self) -> None:
        self._runs: weakref.WeakKeyDictionary[AbstractChannel, _ChannelRun] = weakref.WeakKeyDictionary()
        self.acks_sent = 0  # multiple-acks written (for the benchmark's curiosity)
        self._writes: set[asyncio.Future[None]] = set()  # ack writes in progress (handles kept)

    def _run(self, delivery: Delivery) -> _ChannelRun | None:
        channel = delivery.channel
        if channel.is_closed:  # the channel is gone: RabbitMQ redelivers the message
            return None
        run = self._runs.get(channel)
        if run is None:
            run = self._runs[channel] = _ChannelRun(channel)
        return run

    def ack(self, delivery: Delivery) -> bool:
        """Mark finished; the ack goes out with the next batch. False if the channel is gone."""
        run = self._run(delivery)
        if run is None:
            return False
        run.finished[delivery.tag] = True
        if not run.scheduled:
            run.scheduled = True
            asyncio.get_running_loop().call_soon(self._flush, run)
        return True

    async def reject(self, delivery: Delivery, *, requeue: bool) -> bool:
        run = self._run(delivery)
        if run is None:
            return False
        tag = delivery.tag
        try:
            await run.channel.basic_reject(tag, requeue=requeue)
        except TRANSPORT_ERRORS as exc:
            logger.debug("reject of tag %d lost with its channel (%s)", tag, exc)
            return False
        # only now, with the reject written, may a multiple-ack cover this tag
        run.finished[tag] = False
        self._flush(run)
        return True

    def _flush(self, run: _ChannelRun) -> None:
        run.scheduled = False
        while run.low in run.finished:
            if run.finished.pop(run.low):
                run.ack_to = run.low
            run.low += 1
        self._write_ack(run)

    def _write_ack(self, run: _ChannelRun) -> None:
        if run.writing or run.ack_to <= run.acked_upto or run.channel.is_closed:
            return
        run.writing = True
        run.acked_upto = run.ack_to
        self.acks_sent += 1
        task = asyncio.ensure_future(run.channel.basic_ack(run.ack_to, multiple=True))
        self._writes.add(task)
        task.add_done_callback(lambda done: self._written(run, done))

    def _written(self, run: _ChannelRun, task: asyncio.Future[None]) -> None:
        self._writes.discard(task)
        run.writing = False
        if not task.cancelled() and task.exception() is not None:
            logger.debug("multiple-ack lost with its channel: %s", task.exception())
            return
        self._write_ack(run)  # tags finished while it was being written

    async def drain(self) -> None:
        """Wait for the acks already decided to be written (before closing the connection)."""
        for run in list(self._runs.values()):
            if run.scheduled:
                self._flush(run)
        while self._writes:  # a finished write may start the next one for its channel
            await asyncio.gather(*list(self._writes), return_exceptions=True)
