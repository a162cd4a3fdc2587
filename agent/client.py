"""The agent: submit inference requests to a dinet deployment and stream their results.

::

    async with Agent("amqp://...", namespace="dinet") as agent:
        async for chunk in agent.generate(model="tiny", prompt="Hello", max_new_tokens=32):
            print(chunk.text, end="", flush=True)
        result = await agent.complete(model="tiny", prompt="Hello", max_new_tokens=32)

Each request is published to ``<namespace>.requests.<priority>`` with a publisher confirm
and ``mandatory=True`` (so it is in RabbitMQ, or the call fails). Every reply (``TokenChunk``
messages, then one ``InferenceResult``) arrives on the agent's own durable reply queue
and is matched to its request by ``request_id``. Delivery is at-least-once upstream, so
the agent drops what it has seen: chunks it already has, and results of finished
requests. A result with an error raises the matching :class:`proto.errors.DinetError`.
Every result's signature is checked first: one that does not verify is refused with
:class:`proto.result_signing.ResultSignatureError`; an unsigned one is accepted and marked
unsigned (``GenerationResult.signed``), and its outcome cannot credit any node.
When a request is over the agent reports what it saw (node, outcome, its own timings) to
the telemetry stream, in the background (:mod:`agent.outcomes`): brokers judge nodes on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue, AbstractRobustConnection
from aio_pika.exceptions import CONNECTION_EXCEPTIONS, DeliveryError
from google.protobuf.message import DecodeError

from agent.config import AgentConfig
from agent.outcomes import OutcomeReporter
from agent.pending import PendingRequest, observation
from agent.results import Chunk, GenerationResult, chunk_from_proto, refusal, result_from_proto
from proto import errors, messages_pb2
from proto.result_signing import Verdict, verify_result
from proto.topology import Topology

logger = logging.getLogger(__name__)

CHUNK_TYPES = frozenset({"TokenChunk", messages_pb2.TokenChunk.DESCRIPTOR.full_name})
REQUEST_TYPE = messages_pb2.InferenceRequest.DESCRIPTOR.name
TRANSPORT_ERRORS = (*CONNECTION_EXCEPTIONS, TimeoutError)
_CLOSED = object()  # queued to a pending request when the agent closes


def retry_delay(attempt: int, base_s: float, max_s: float = 5.0) -> float:
    """Backoff before try ``attempt`` (2, 3, ...): base, 2*base, 4*base, ... at most ``max_s``."""
    return float(min(base_s * 2 ** (attempt - 2), max_s))


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
            elif item is _CLOSED:
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


class Agent:
    """A client of one dinet deployment. Use as ``async with Agent(url) as agent: ...``.

    :param url: RabbitMQ URL (overrides ``config.amqp_url``).
    :param namespace: deployment namespace (overrides ``config.namespace``).
    """

    def __init__(self, url: str | None = None, *, namespace: str | None = None,
                 config: AgentConfig | None = None) -> None:
        cfg = config or AgentConfig()
        if url is not None:
            cfg.amqp_url = url
        if namespace is not None:
            cfg.namespace = namespace
        cfg.__post_init__()
        self.config = cfg
        self.topology = Topology(cfg.namespace)
        self.reply_queue_name = self.topology.reply_queue(cfg.agent_id)
        self._connection: AbstractRobustConnection | None = None
        self._publish_channel: AbstractChannel | None = None
        self._reply_channel: AbstractChannel | None = None
        self._reply_queue: AbstractQueue | None = None
        self._consumer_tag: str | None = None
        self._pending: dict[str, PendingRequest] = {}
        self._finished: dict[str, None] = {}  # insertion-ordered set of finished request ids
        self.duplicates_dropped = 0
        self.outcomes = OutcomeReporter(self.topology, cfg.agent_id, timeout_s=cfg.publish_timeout_s)

    async def __aenter__(self) -> Agent:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def connect(self) -> None:
        """Open a robust connection, declare the topology and start consuming the reply queue."""
        self._connection = await aio_pika.connect_robust(self.config.amqp_url, timeout=10)
        try:
            self._publish_channel = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
            await self.topology.declare_core(self._publish_channel)
            self._reply_channel = await self._connection.channel()
            await self._reply_channel.set_qos(prefetch_count=self.config.reply_prefetch)
            self._reply_queue = await self.topology.reply_queue_spec(self.config.agent_id).declare(self._reply_channel)
            self._consumer_tag = await self._reply_queue.consume(self._on_reply)
        except BaseException:
            await self._connection.close()
            raise
        logger.debug("agent %s connected; replies on %s", self.config.agent_id, self.reply_queue_name)

    async def close(self) -> None:
        """Cancel every request still waiting and close the connection."""
        for pending in self._pending.values():
            pending.items.put_nowait(_CLOSED)
        self._pending.clear()
        await self.outcomes.flush(self.config.outcome_flush_s)
        if self.config.delete_reply_queue_on_close and self._reply_queue is not None:
            with contextlib.suppress(Exception):
                if self._consumer_tag is not None:
                    await self._reply_queue.cancel(self._consumer_tag)
                await self._reply_queue.delete(if_unused=False, if_empty=False)
        self._consumer_tag = None
        self._reply_queue = None
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await self._connection.close()
        self._connection = self._publish_channel = self._reply_channel = None

    # -- public API ---------------------------------------------------------------------------
    def generate(
        self,
        *,
        model: str,
        prompt: str,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        priority: str | None = None,
        budget: float = 0.0,
        deadline_s: float | None = None,
        timeout: float | None = None,
        method_hint: str = "",
        group_hint: str = "",
        request_id: str | None = None,
    ) -> Generation:
        """A request to stream: ``async for chunk in agent.generate(...)``.

        :param temperature: 0 = greedy; otherwise temperature + top-p sampling.
        :param seed: makes sampling reproducible (same seed and request, same tokens).
        :param priority: "high" | "normal" | "batch" (default: the config's).
        :param budget: most the request may cost (price units); 0 = no limit.
        :param deadline_s: answer within this many seconds or get ``DeadlineExceededError``.
        :param timeout: stop waiting after this many seconds (``TimeoutError``).
        :raises ValueError: for a priority that does not exist (nothing is sent).
        """
        priority = priority or self.config.default_priority
        self.topology.request_queue(priority)  # raises ValueError naming the priorities
        if max_new_tokens < 0:
            raise errors.MaxNewTokensError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if seed is not None and not 0 <= seed < 2**64:
            raise errors.InvalidRequestError(f"seed must be between 0 and 2**64 - 1, got {seed}")
        now = time.time()
        request = messages_pb2.InferenceRequest(
            request_id=request_id or uuid.uuid4().hex,
            model=model,
            prompt=prompt,
            max_new_tokens=max_new_tokens,
            sampling=messages_pb2.SamplingParams(
                temperature=temperature, top_p=top_p, seed=seed or 0, has_seed=seed is not None
            ),
            priority=priority,
            budget=budget,
            reply_to=self.reply_queue_name,
            deadline_unix=now + deadline_s if deadline_s is not None else 0.0,
            submitted_at=now,
            agent_id=self.config.agent_id,
            method_hint=method_hint,
            group_hint=group_hint,
        )
        if timeout is None:
            timeout = self.config.result_timeout_s
        if timeout is None and deadline_s is not None:
            timeout = deadline_s + self.config.deadline_grace_s
        return Generation(self, request, timeout_s=timeout)

    async def complete(self, **kwargs: Any) -> GenerationResult:
        """Submit a request and wait for its result (same arguments as :meth:`generate`)."""
        return await self.generate(**kwargs).result()

    # -- internals ----------------------------------------------------------------------------
    def _register(self, request_id: str) -> PendingRequest:
        if self._connection is None:
            raise RuntimeError("the agent is not connected; use `async with Agent(...)` or await connect()")
        if request_id in self._pending or request_id in self._finished:
            raise ValueError(f"request id {request_id!r} was already used by this agent")
        pending = PendingRequest(request_id)
        self._pending[request_id] = pending
        return pending

    def _forget(self, request_id: str) -> None:
        """The request is over (answered, failed or given up): later replies for it are duplicates."""
        self._pending.pop(request_id, None)
        self._finished[request_id] = None
        while len(self._finished) > self.config.remembered_requests:
            self._finished.pop(next(iter(self._finished)))

    async def _publish_request(self, request: messages_pb2.InferenceRequest) -> None:
        """Publish with a confirm; retries transport errors only, with backoff, then gives up."""
        message = aio_pika.Message(
            request.SerializeToString(),
            type=REQUEST_TYPE,
            message_id=request.request_id,
            correlation_id=request.request_id,
            reply_to=request.reply_to,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            timestamp=dt.datetime.now(dt.UTC),
            content_type="application/x-protobuf",
            app_id=self.config.agent_id,
        )
        routing_key = self.topology.request_queue(request.priority)
        attempts = self.config.publish_attempts
        for attempt in range(1, attempts + 1):
            if attempt > 1:
                await asyncio.sleep(retry_delay(attempt, self.config.retry_backoff_s))
            channel = self._publish_channel
            if channel is None:
                raise RuntimeError("the agent is closed")
            try:
                await channel.default_exchange.publish(
                    message, routing_key=routing_key, mandatory=True, timeout=self.config.publish_timeout_s
                )
                return
            except DeliveryError as exc:
                raise ConnectionError(
                    f"RabbitMQ refused request {request.request_id} on {routing_key} ({exc}); "
                    "run `dinet-broker init` to declare the queues"
                ) from exc
            except TRANSPORT_ERRORS as exc:
                if attempt == attempts:
                    raise ConnectionError(
                        f"could not publish request {request.request_id} after {attempts} tries ({exc!r}); "
                        "is RabbitMQ reachable?"
                    ) from exc
                logger.warning("publishing %s failed (%r); retrying", request.request_id, exc)

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        try:
            self._dispatch(message)
        except Exception:  # a bad reply must never stop the consumer
            logger.exception("could not handle a reply message")
        with contextlib.suppress(*TRANSPORT_ERRORS):
            await message.ack()

    def _dispatch(self, message: AbstractIncomingMessage) -> None:
        is_chunk = message.type in CHUNK_TYPES
        try:
            parsed: Any = (messages_pb2.TokenChunk if is_chunk else messages_pb2.InferenceResult).FromString(
                message.body
            )
        except DecodeError:
            logger.warning("dropping an unparsable reply (type %r, %d bytes)", message.type, len(message.body))
            return
        pending = self._pending.get(parsed.request_id)
        if pending is None:
            self.duplicates_dropped += 1
            logger.debug("dropping a reply for finished or unknown request %s", parsed.request_id)
            return
        if is_chunk:
            self._on_chunk(pending, parsed)
        else:
            self._on_result(pending, parsed)

    def _on_chunk(self, pending: PendingRequest, message: messages_pb2.TokenChunk) -> None:
        end = message.index + len(message.token_ids)
        if end <= pending.next_index or message.index > pending.next_index:
            # seen already (a redelivered task streams again), or a gap that the result will fill
            self.duplicates_dropped += end <= pending.next_index
            return
        skip = pending.next_index - message.index
        chunk = chunk_from_proto(message)
        if skip:  # partly seen: keep only the new tokens; their text cannot be split off the chunk's
            chunk = Chunk(chunk.request_id, pending.next_index, chunk.token_ids[skip:], "", chunk.node_id)
        if pending.first_token_at is None:
            pending.first_token_at = time.perf_counter()
        pending.node_id = pending.node_id or message.node_id
        pending.next_index = end
        pending.streamed_text += chunk.text
        pending.items.put_nowait(chunk)

    def _on_result(self, pending: PendingRequest, message: messages_pb2.InferenceResult) -> None:
        self._forget(pending.request_id)
        verdict = verify_result(message)
        if verdict is Verdict.INVALID:  # a bad answer from whoever sent it: never handed over as the node's
            logger.warning("refusing the result of request %s: it names node %r but its signature does not verify",
                           pending.request_id, message.node_id)
            pending.items.put_nowait(refusal(message))
            self._report(pending, message, verdict=verdict)
            return
        if verdict is Verdict.UNSIGNED:
            logger.debug("result of request %s from node %r is unsigned", pending.request_id, message.node_id)
        if not message.ok:
            pending.items.put_nowait(errors.DinetError.from_proto(message.error))
            self._report(pending, message, verdict=verdict)
            return
        now = time.perf_counter()
        tail = tuple(message.token_ids[pending.next_index :])
        if tail:  # tokens the stream did not bring (chunks lost or out of order): hand them over now
            text = message.text[len(pending.streamed_text) :] if message.text.startswith(pending.streamed_text) else ""
            pending.items.put_nowait(Chunk(pending.request_id, pending.next_index, tail, text, message.node_id))
            if pending.first_token_at is None:
                pending.first_token_at = now
        submitted = pending.submitted or now
        first = pending.first_token_at if pending.first_token_at is not None else now
        pending.items.put_nowait(result_from_proto(message, ttft_s=first - submitted, total_s=now - submitted,
                                                   signed=verdict is Verdict.VALID))
        self._report(pending, message, now=now, verdict=verdict)

    def _report(self, pending: PendingRequest, message: messages_pb2.InferenceResult | None, *,
                deadline_passed: bool = False, now: float | None = None, verdict: Verdict = Verdict.UNSIGNED) -> None:
        """Hand what this agent saw of a finished request to the background reporter (never raises)."""
        if self.config.report_outcomes:
            seen = observation(pending, message, deadline_passed=deadline_passed, now=now, verdict=verdict)
            self.outcomes.report(self._publish_channel, seen)
