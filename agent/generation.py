"""One request as the user holds it: a stream of :class:`Chunk` s, then its result.

:meth:`agent.client.Agent.generate` returns a :class:`Generation`; iterating it (or
:meth:`Generation.start`, or :meth:`Generation.result`) publishes the request, then
hands over what :mod:`agent.replies` queues for it: chunks, then the result or the
typed error. Waiting is bounded by the request's timeout: with none left, the request
is forgotten, reported as unanswered, and the user gets ``DeadlineExceededError`` (its
deadline passed) or a ``TimeoutError`` that says which services to check.

Kept apart from :mod:`agent.client` (the connection and what it shares among requests)
because this is the per-request side: what one caller waits on, and for how long.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from agent.pending import PendingRequest
from agent.replies import CLOSED
from agent.results import Chunk, GenerationResult
from proto import errors, messages_pb2

if TYPE_CHECKING:
    from agent.client import Agent


class Generation:
    """One request: iterate it for :class:`Chunk` s, then ``await result()`` for the end.

    The request is published when iteration (or :meth:`start`, or :meth:`result`) begins.
    """

    def __init__(self, agent: Agent, request: messages_pb2.InferenceRequest, *, timeout_s: float | None) -> None:
        self._agent = agent
        self._request = request
        self._timeout_s = timeout_s
        self._started = False
        self._pending: PendingRequest | None = None
        self._result: GenerationResult | None = None
        self._error: BaseException | None = None
        self._wait_until: float | None = None

    @property
    def request_id(self) -> str:
        return self._request.request_id

    async def start(self) -> None:
        """Publish the request (once); returns when RabbitMQ has confirmed it."""
        if self._started:
            return
        self._started = True
        self._pending = self._agent._register(self._request.request_id)
        if self._timeout_s is not None:
            self._wait_until = time.monotonic() + self._timeout_s
        self._pending.submitted = time.perf_counter()
        try:
            await self._agent._publish_request(self._request)
        except BaseException:
            self._agent._forget(self._request.request_id)
            raise

    def __aiter__(self) -> AsyncIterator[Chunk]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Chunk]:
        await self.start()
        pending = self._pending
        if pending is None:
            raise RuntimeError("generation was not started")
        while self._result is None and self._error is None:
            item = await self._next_item(pending)
            if isinstance(item, Chunk):
                yield item
            elif isinstance(item, GenerationResult):
                self._result = item
            elif item is CLOSED:
                self._error = asyncio.CancelledError("the agent was closed before the result arrived")
            else:
                self._error = item
        if self._error is not None:
            raise self._error

    async def _next_item(self, pending: PendingRequest) -> Any:
        if self._wait_until is None:
            return await pending.items.get()
        remaining = self._wait_until - time.monotonic()
        try:
            return await asyncio.wait_for(pending.items.get(), timeout=max(remaining, 0.0))
        except TimeoutError:
            self._agent._forget(self.request_id)
            deadline = self._request.deadline_unix
            self._agent._report(pending, None, deadline_passed=bool(deadline) and time.time() >= deadline)
            if deadline and time.time() >= deadline:
                return errors.DeadlineExceededError(
                    f"no answer for request {self.request_id} before its deadline; allow a longer deadline"
                )
            return TimeoutError(
                f"no answer for request {self.request_id} within {self._timeout_s:.1f} s; check that a broker "
                f"(dinet-broker run) and a node serving model {self._request.model!r} (dinet-node run) are up "
                f"in namespace {self._agent.config.namespace!r}"
            )

    async def result(self) -> GenerationResult:
        """Wait for the end (consuming any chunks not read yet) and return the result.

        :raises proto.errors.DinetError: the typed error the network answered with.
        :raises TimeoutError: nothing came back in time.
        """
        async for _ in self:
            pass
        if self._result is None:  # iteration ended without a result: it raised, or was consumed before
            raise self._error or RuntimeError("generation finished without a result")
        return self._result
