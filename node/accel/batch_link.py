"""Driver side of ``BlockService.InferenceBatch``: one stream per hop carrying all sessions' steps.

With continuous batching, a driver's sessions reach a hop in groups (with two hops, about half of
them alternate between the hops). Sending one ``Inference`` message per session makes the hop
guess how long to wait for the rest of a group, and costs a gRPC message per session per hop on
both sides. A :class:`BatchLink` instead queues the steps its sessions hand it and sends them as
one ``StepBatch`` as soon as every batched session of the driver is waiting for something (a hop
or the LM head; :class:`StepGate` counts them), or ``window_s`` after the first queued step. The
hop runs the message in one forward and answers all its steps in one message.

Each session keeps its own ``session_id`` (and KV cache on the hop). A step answered with an error
fails that session only (:class:`~node.accel.chain_session.HopError`); a broken stream fails the
steps in flight on it and is reopened by the next step, with a new ``generation`` so that sessions
whose caches lived on the old stream move to a new route instead of stepping into nothing.

The driver-wide bookkeeping the links share (:class:`StepGate`, :func:`split_groups`) is
:mod:`node.accel.step_gate`'s; both are re-exported here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from node.accel.chain_session import Hop, HopError, SwarmTokenError, status_error
from node.accel.step_gate import StepGate, split_groups
from proto import blocks_pb2

__all__ = ["BatchLink", "StepGate", "split_groups"]  # the gate and the grouping live in step_gate.py

logger = logging.getLogger(__name__)

_CODES = {code.value[0]: code for code in grpc.StatusCode}


@dataclass
class _Entry:
    session_id: str
    step: blocks_pb2.InferenceStep
    future: asyncio.Future[blocks_pb2.InferenceStepResult] | None  # None: a close nobody waits for
    gate: StepGate | None = None  # set while the waiter counts as parked

    def release(self) -> None:
        """Stop counting the waiter as parked (exactly once)."""
        if self.gate is not None:
            self.gate.unpark()
            self.gate = None


class BatchLink:
    """One ``InferenceBatch`` stream to ``hop``, shared by the driver's batched sessions."""

    def __init__(self, hop: Hop, open_stream: Callable[[], Any], gate: StepGate, *,
                 window_s: float = 0.002, hold_s: float = 0.1, timeout_s: float = 60.0) -> None:
        self.hop = hop
        self._open_stream = open_stream  # () -> a grpc.aio stream-stream call of InferenceBatch
        self.gate = gate
        self.window_s = window_s  # longest wait for sessions that are not parked yet
        self.hold_s = hold_s  # longest wait of a straggler group for another group to merge with
        self.timeout_s = timeout_s
        self.unsupported = False  # the hop answered UNIMPLEMENTED: use per-session Inference streams
        self.generation = 0  # bumped whenever the stream is replaced; sessions on an older one are gone
        self._fatal: SwarmTokenError | None = None  # the last stream was refused for our swarm token
        self._call: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._queue: list[_Entry] = []
        self._in_flight: deque[list[_Entry]] = deque()  # sent messages, in the order the hop answers them
        self._outbox: deque[tuple[Any, blocks_pb2.StepBatch]] = deque()  # (stream, message) not yet written
        self._writer: asyncio.Task[None] | None = None  # the one task writing (a stream takes one write at a time)
        self._timer: asyncio.TimerHandle | None = None
        self._first_queued = 0.0
        gate.links.append(self)

    @property
    def queued(self) -> bool:
        return bool(self._queue)

    def ensure_open(self) -> int:
        """Open the stream if needed; returns its generation (a session remembers the one it opened on)."""
        if self._call is None:
            self.generation, self._fatal = self.generation + 1, None
            self._call = self._open_stream()
            self._reader = asyncio.get_running_loop().create_task(self._read(self._call, self.generation))
        return self.generation

    async def step(self, step: blocks_pb2.InferenceStep, generation: int) -> blocks_pb2.InferenceStepResult:
        """Queue one session's step; returns its result once the hop answered the message carrying it.

        :raises HopError: when the step failed on the hop, the stream broke, or no reply came in time.
        """
        if generation != self.generation or self._call is None:  # (a refused swarm token: say so, not "reset")
            raise self._fatal or HopError(self.hop, "the batched stream was reset; the session's cache is gone",
                                          retryable=True)
        future: asyncio.Future[blocks_pb2.InferenceStepResult] = asyncio.get_running_loop().create_future()
        entry = _Entry(step.session_id, step, future, gate=self.gate)
        self._queue.append(entry)
        self._arm()
        self.gate.park()
        try:
            async with asyncio.timeout(self.timeout_s):
                return await future
        except TimeoutError:
            raise HopError(self.hop, f"no reply within {self.timeout_s:.1f} s", retryable=True) from None
        finally:
            entry.release()

    def close_session(self, session_id: str, generation: int) -> None:
        """Tell the hop to drop the session (sent with the next message; nobody waits for the answer)."""
        if generation == self.generation and self._call is not None:
            self._queue.append(_Entry(session_id, blocks_pb2.InferenceStep(session_id=session_id, close=True), None))
            self._arm()
            self.gate.maybe_flush()

    def _arm(self) -> None:
        if self._timer is None:
            loop = asyncio.get_running_loop()
            if not self._queue[:-1]:
                self._first_queued = loop.time()
            self._timer = loop.call_later(self.window_s, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._holding():
            self._arm()
        else:
            self.flush()

    def _holding(self) -> bool:
        """Hold the queue back so it can merge with a group that is elsewhere in the chain.

        Sessions that joined at different times form more groups than the chain has hops; each extra
        group costs a forward per hop per token. Until ``hold_s`` is up, such a queue waits for
        another group to come back to this hop; with at most ``depth`` groups it goes at once.
        """
        if not self._queue or self.gate.messages_in_flight + 1 <= self.gate.depth:
            return False
        return asyncio.get_running_loop().time() < self._first_queued + self.hold_s

    def flush(self) -> None:
        """Send the queued steps, as one message or (see :func:`split_groups`) one per pipeline group."""
        if self._holding():
            return  # the timer looks again
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        queued = [e for e in self._queue if e.future is None or not e.future.done()]
        self._queue = []
        if not queued or self._call is None:
            return
        for batch in split_groups(queued, self.gate.open, self.gate.depth):
            self._in_flight.append(batch)
            self.gate.messages_in_flight += 1
            self._outbox.append((self._call, blocks_pb2.StepBatch(steps=[e.step for e in batch])))
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._write_all())

    async def _write_all(self) -> None:
        """Write queued messages in order, one at a time."""
        try:
            while self._outbox:
                call, message = self._outbox.popleft()
                if call is not self._call:
                    continue  # that stream broke; its steps were failed already
                try:
                    await call.write(message)
                except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError, OSError) as exc:
                    self._broken(call, HopError(self.hop, f"stream unusable: {exc}", retryable=True))
        finally:
            self._writer = None

    async def _read(self, call: Any, generation: int) -> None:
        error: HopError
        try:
            while True:
                reply = await call.read()
                if reply is grpc.aio.EOF:
                    error = HopError(self.hop, "closed the batched stream", retryable=True)
                    break
                if not self._in_flight:
                    error = HopError(self.hop, "answered a message that was not sent", retryable=True)
                    break
                self.gate.messages_in_flight -= 1
                self._resolve(self._in_flight.popleft(), reply)
        except grpc.aio.AioRpcError as exc:
            self.unsupported = self.unsupported or exc.code() == grpc.StatusCode.UNIMPLEMENTED
            error = status_error(self.hop, exc.code(), exc.details())
            error.retryable = error.retryable or self.unsupported  # unsupported: the session falls back
        except asyncio.CancelledError:
            error = HopError(self.hop, "the driver closed the batched stream", retryable=True)
        self._broken(call, error)

    def _resolve(self, batch: list[_Entry], reply: blocks_pb2.StepBatchResult) -> None:
        by_id = {r.session_id: r for r in reply.results}
        for entry in batch:
            entry.release()
            if entry.future is None or entry.future.done():
                continue
            result = by_id.get(entry.session_id)
            if result is None:
                entry.future.set_exception(HopError(self.hop, "no result for the session's step", retryable=True))
            elif result.error_code:
                code = _CODES.get(result.error_code, grpc.StatusCode.UNKNOWN)
                entry.future.set_exception(status_error(self.hop, code, result.error))
            else:
                entry.future.set_result(result.result)

    def _broken(self, call: Any, error: HopError) -> None:
        """Fail everything sent or queued on ``call`` and forget it; the next session opens a new stream."""
        if call is not self._call:
            return
        self._call, self._fatal = None, (error if isinstance(error, SwarmTokenError) else None)
        call.cancel()
        pending = [e for batch in self._in_flight for e in batch] + self._queue
        self.gate.messages_in_flight -= len(self._in_flight)
        self._in_flight.clear()
        self._outbox.clear()
        self._queue = []
        for entry in pending:
            entry.release()
            if entry.future is not None and not entry.future.done():
                entry.future.set_exception(error)

    async def close(self) -> None:
        call, reader, writer = self._call, self._reader, self._writer
        if call is not None:
            self._broken(call, HopError(self.hop, "the driver closed the batched stream", retryable=True))
        for task in (reader, writer):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
