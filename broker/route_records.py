"""Routing records on the telemetry stream, many per message: one confirmed publish per event-loop turn.

Reputation judges a node against the decision the broker made (broker/reputation.py), so the
broker appends that decision to the telemetry stream before the task goes out: a node learns
a request id only once the genuine record is there. One stream entry per request doubled the
broker's publishes and took about 40 % of its throughput (815 instead of ~480 µs of broker CPU
per request in ``scripts/bench/broker.py``). The deliveries of one loop turn arrive together (a
prefetch window refills after each batched ack), but under a steady stream a loop turn holds only
2-3 of them, so :class:`RouteRecorder` gathers the records of up to ``window_s`` (5 ms) or
``max_batch`` records into one ``RoutingRecordBatch`` entry, and every request of the entry waits
for its confirm; the order "record confirmed, then task" holds for each of them. The price is up
to 5 ms more before a task reaches its group queue, against seconds of inference; routing
throughput is unchanged because up to ``max_in_flight`` requests are in flight at once.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable

from proto import messages_pb2

MAX_BATCH = 256  # records per stream entry (an entry stays well below a few hundred KiB)
WINDOW_S = 0.005  # how long the first record of an entry waits for others (a request's task waits as long)

PublishBatch = Callable[[bytes, str], Awaitable[None]]  # (body, message id) -> confirmed


class RouteRecorder:
    """Batches :class:`RoutingRecord` s; :meth:`record` returns once its batch is confirmed on the stream."""

    def __init__(
        self, publish_batch: PublishBatch, *, broker_id: str, max_batch: int = MAX_BATCH, window_s: float = WINDOW_S
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        if not 0 <= window_s <= 1:
            raise ValueError("window_s must be in [0, 1] seconds")
        self._window_s = window_s
        self._publish = publish_batch
        self._broker_id = broker_id
        self._max_batch = max_batch
        self._pending: list[tuple[messages_pb2.RoutingRecord, asyncio.Future[None]]] = []
        self._timer: asyncio.Handle | None = None
        self._sequence = itertools.count(1)
        self._tasks: set[asyncio.Task[None]] = set()
        self.batches = 0  # entries published (observability: records / batches = mean batch)
        self.records = 0

    async def record(self, record: messages_pb2.RoutingRecord) -> None:
        """Queue ``record`` and wait until the entry holding it is confirmed.

        :raises: whatever publishing the batch raised (refused by RabbitMQ, connection lost), for
            every request of the batch alike.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._pending.append((record, future))
        if len(self._pending) >= self._max_batch:
            self._flush()
        elif self._timer is None:
            if self._window_s:
                self._timer = loop.call_later(self._window_s, self._flush)
            else:  # the rest of this loop turn only
                self._timer = loop.call_soon(self._flush)
        await future

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._pending:
            return
        batch, self._pending = self._pending, []
        task = asyncio.get_running_loop().create_task(self._send(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, batch: list[tuple[messages_pb2.RoutingRecord, asyncio.Future[None]]]) -> None:
        body = messages_pb2.RoutingRecordBatch(records=[record for record, _ in batch]).SerializeToString()
        try:
            await self._publish(body, f"routes:{self._broker_id}:{next(self._sequence)}")
        except BaseException as exc:  # every waiter hears it; cancellation included
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc if isinstance(exc, Exception) else asyncio.CancelledError())
            if not isinstance(exc, Exception):
                raise
            return
        self.batches += 1
        self.records += len(batch)
        for _, future in batch:
            if not future.done():
                future.set_result(None)

    async def close(self) -> None:
        """Send what is queued and wait for the entries in flight (their waiters get the outcome)."""
        self._flush()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
