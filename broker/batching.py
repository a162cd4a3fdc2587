"""Routing the requests of one event-loop turn together (one batched scheduler prediction).

Why: a learned policy's cost per request is mostly fixed numpy overhead; scoring the
requests that RabbitMQ delivered in the same burst (a prefetch window refills in
bursts, one per batch of acks) in one ``select_many`` call divides it among them.
The first request of a turn schedules a flush with ``loop.call_soon``; every request
that reaches routing before that callback runs joins the batch. A request waits at
most for the rest of its loop turn, and that wait is part of the ``sched_ms`` the
broker reports.
"""

from __future__ import annotations

import asyncio
import logging

from broker.routing import RouteEntry, Router
from proto import messages_pb2

logger = logging.getLogger(__name__)


class RouteBatcher:
    """Collects the requests routed in one loop turn and routes them with :meth:`Router.route_many`."""

    def __init__(self, router: Router, *, max_batch: int = 256) -> None:
        self.router = router
        self.max_batch = max_batch
        self._entries: list[RouteEntry] = []
        self._futures: list[asyncio.Future[messages_pb2.RoutingDecision]] = []
        self._scheduled = False
        self.batches = 0
        self.routed = 0

    def route(
        self, request: messages_pb2.InferenceRequest, *, now: float, concurrency: int
    ) -> asyncio.Future[messages_pb2.RoutingDecision]:
        """A future for the request's decision (or its exception: typed errors as :meth:`Router.route`)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[messages_pb2.RoutingDecision] = loop.create_future()
        self._entries.append((request, now, concurrency))
        self._futures.append(future)
        if len(self._entries) >= self.max_batch:
            self._flush()
        elif not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        self._scheduled = False
        entries, futures = self._entries, self._futures
        self._entries, self._futures = [], []
        if not entries:
            return
        try:
            results = self.router.route_many(entries)
        except Exception as error:  # route_many keeps errors per slot; this is a bug in it
            logger.exception("batched routing failed; every request of the batch is retried")
            results = [error] * len(entries)
        self.batches += 1
        self.routed += len(entries)
        for future, result in zip(futures, results, strict=True):
            if future.done():  # its delivery task was cancelled (shutdown)
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)
