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
unsigned (``GenerationResult.signed``), and its outcome cannot credit any node. With
``AgentConfig.initial_peers`` the agent also joins the DHT (client mode) and checks that a
result's signer owns the node id it names (:mod:`agent.owners`): a non-owner's answer is refused
with :class:`agent.owners.SignerNotOwnerError`; the others carry ``signer_confirmed``.
When a request is over the agent reports what it saw (node, outcome, its own timings) to
the telemetry stream, in the background (:mod:`agent.outcomes`): brokers judge nodes on it.

This module holds the connection and the public API; each part of a request's life has
a module of its own: publishing with bounded retries (:mod:`agent.publish`), matching
replies to requests (:mod:`agent.replies`) and one caller's wait (:mod:`agent.generation`).
:class:`Generation`, :func:`retry_delay` and the message-type constants are re-exported here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue, AbstractRobustConnection

from agent.config import AgentConfig
from agent.generation import Generation
from agent.outcomes import OutcomeReporter
from agent.owners import DhtOwnerSource, OwnerDirectory
from agent.pending import PendingRequest, observation
from agent.publish import REQUEST_TYPE, TRANSPORT_ERRORS, publish_request, retry_delay
from agent.replies import CHUNK_TYPES, ReplyRouter
from agent.results import GenerationResult
from proto import errors, messages_pb2
from proto.result_signing import Verdict
from proto.topology import Topology

__all__ = ["CHUNK_TYPES", "REQUEST_TYPE", "TRANSPORT_ERRORS", "Agent", "Generation", "retry_delay"]

logger = logging.getLogger(__name__)


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
        self.replies = ReplyRouter(cfg, self._report)
        self.outcomes = OutcomeReporter(self.topology, cfg.agent_id, timeout_s=cfg.publish_timeout_s)
        self._owner_source: DhtOwnerSource | None = None
        self.owners: OwnerDirectory | None = None  # node owners from the DHT; None = no DHT configured

    @property
    def duplicates_dropped(self) -> int:
        """Replies dropped as already seen (redeliveries, replies for finished requests)."""
        return self.replies.duplicates_dropped

    async def __aenter__(self) -> Agent:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def connect(self) -> None:
        """Join the DHT when configured, open a robust connection, declare the topology, consume the reply queue.

        :raises agent.owners.DhtJoinError: ``initial_peers`` are set and the DHT could not be joined.
        :raises ValueError: a malformed multiaddr in ``initial_peers``.
        """
        if self.config.initial_peers:
            await self._join_dht()
        try:
            self._connection = await aio_pika.connect_robust(self.config.amqp_url, timeout=10)
        except BaseException:
            await self._leave_dht()
            raise
        try:
            self._publish_channel = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
            await self.topology.declare_core(self._publish_channel)
            self._reply_channel = await self._connection.channel()
            await self._reply_channel.set_qos(prefetch_count=self.config.reply_prefetch)
            self._reply_queue = await self.topology.reply_queue_spec(self.config.agent_id).declare(self._reply_channel)
            self._consumer_tag = await self._reply_queue.consume(self._on_reply)
        except BaseException:
            await self._connection.close()
            await self._leave_dht()
            raise
        logger.debug("agent %s connected; replies on %s", self.config.agent_id, self.reply_queue_name)

    async def close(self) -> None:
        """Cancel every request still waiting and close the connection."""
        self.replies.cancel_all()
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
        await self._leave_dht()

    async def _join_dht(self) -> None:
        """Start the DHT peer (in a thread: it forks and waits) and the cached owner lookups on top of it."""
        cfg = self.config
        source = await asyncio.to_thread(DhtOwnerSource, cfg.initial_peers)
        self._owner_source = source
        self.owners = OwnerDirectory(source.fetch, ttl_s=cfg.owner_cache_s, timeout_s=cfg.owner_lookup_timeout_s)
        self.replies.owners = self.owners

    async def _leave_dht(self) -> None:
        self.replies.owners = None
        if self.owners is not None:
            await self.owners.close()
            self.owners = None
        if self._owner_source is not None:
            await asyncio.to_thread(self._owner_source.shutdown)
            self._owner_source = None

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

    # -- internals (used by Generation) ------------------------------------------------------------
    def _register(self, request_id: str) -> PendingRequest:
        if self._connection is None:
            raise RuntimeError("the agent is not connected; use `async with Agent(...)` or await connect()")
        return self.replies.register(request_id)

    def _forget(self, request_id: str) -> None:
        """The request is over (answered, failed or given up): later replies for it are duplicates."""
        self.replies.forget(request_id)

    async def _publish_request(self, request: messages_pb2.InferenceRequest) -> None:
        """Publish with a confirm; retries transport errors only, with backoff, then gives up."""
        routing_key = self.topology.request_queue(request.priority)
        await publish_request(lambda: self._publish_channel, request, routing_key, self.config)

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        try:
            await self.replies.receive(message)
        except Exception:  # a bad reply must never stop the consumer
            logger.exception("could not handle a reply message")
        with contextlib.suppress(*TRANSPORT_ERRORS):
            await message.ack()

    def _report(self, pending: PendingRequest, message: messages_pb2.InferenceResult | None, *,
                deadline_passed: bool = False, now: float | None = None, verdict: Verdict = Verdict.UNSIGNED) -> None:
        """Hand what this agent saw of a finished request to the background reporter (never raises)."""
        if self.config.report_outcomes:
            seen = observation(pending, message, deadline_passed=deadline_passed, now=now, verdict=verdict)
            self.outcomes.report(self._publish_channel, seen)
