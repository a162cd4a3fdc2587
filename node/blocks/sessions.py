"""The inference sessions open on one node: admission, KV-cache allocation, lookup, release.

A session lives as long as its driver's ``Inference`` stream. While it does, the node
must find it by id (a ``Push`` from the previous hop names only the session id), bound
how many sessions one peer host holds (so one stranger cannot take every cache slot),
and, when the stream ends however it ends, free its cache and close its push link.

This bookkeeping is kept apart from the servicer (:mod:`node.blocks.server`), which
only speaks the protocol, so that every path that opens or ends a session goes
through the one table that keeps the counts right.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field

import grpc

from node.blocks.kv_cache import CacheFullError, CacheManager, CacheSpec, SessionCache
from node.blocks.peer_input import StepError
from node.blocks.push import PushLink


@dataclass(eq=False)
class LiveSession:
    """A session open on this node: its cache, the driver's stream, and where its outputs are pushed."""

    session_id: str
    start: int
    end: int
    cache: SessionCache
    context: grpc.aio.ServicerContext  # the driver's stream: every step is answered there
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # driver steps and pushed steps, one at a time
    last_step: int = 0  # highest step id applied
    link: PushLink | None = None  # Push stream into the next hop's session


class SessionTable:
    """Open sessions by id and by peer host, over the node's :class:`CacheManager`."""

    def __init__(self, caches: CacheManager, *, max_per_peer: int) -> None:
        self.caches = caches
        self.max_per_peer = max_per_peer
        self._per_peer: Counter[str] = Counter()  # open sessions by peer host
        self._live: dict[str, LiveSession] = {}  # open sessions by id (what pushes may target)

    def get(self, session_id: str) -> LiveSession | None:
        return self._live.get(session_id)

    def admit(self, peer: str) -> None:
        """Refuse a new session from ``peer`` (a host) that already holds its share (RESOURCE_EXHAUSTED)."""
        if self._per_peer[peer] >= self.max_per_peer:
            raise StepError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"{peer} already holds {self.max_per_peer} sessions here")

    def open(
        self, session_id: str, spec: CacheSpec, *, start: int, end: int, context: grpc.aio.ServicerContext, peer: str
    ) -> LiveSession:
        """Charge the session's whole cache to the node's budget and register it; :meth:`end` undoes both."""
        try:
            cache = self.caches.allocate(session_id, spec)
        except CacheFullError as exc:
            raise StepError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)) from None
        except KeyError as exc:
            raise StepError(grpc.StatusCode.ALREADY_EXISTS, str(exc)) from None
        live = LiveSession(session_id, start, end, cache, context)
        self._live[session_id] = live
        self._per_peer[peer] += 1
        return live

    def end(self, live: LiveSession, peer: str) -> None:
        """The driver's stream is over: free the cache, forget the session, drop its push link."""
        self.caches.free(live.session_id)
        self._live.pop(live.session_id, None)
        if live.link is not None:
            live.link.abort()
        self._per_peer[peer] -= 1
        if self._per_peer[peer] <= 0:
            del self._per_peer[peer]
