"""The agent's requests in flight, and every reply matched to its request.

Replies (``TokenChunk`` messages, then one ``InferenceResult``) arrive on the agent's one
reply queue and are matched to their request by ``request_id``. Delivery upstream is
at-least-once, so what was seen is dropped: chunks the request already has (a
redelivered task streams again), and any reply for a request that is over (the ids of
the last ``AgentConfig.remembered_requests`` finished requests are kept for that).
Tokens a lost or out-of-order chunk did not bring are handed over from the result.

Chunks are not signed; the result is. So when the result comes, the tokens already
handed over are checked against its ``token_ids`` (:func:`stream_divergence`). They can
disagree honestly (a task redelivered to another node after the first died mid-stream,
sampling unseeded) or not (a chunk altered or forged on the way). Either way the caller
was shown tokens that are not the answer, and a chunk cannot be taken back: no further
chunk is handed over, a warning names the request and the first differing token, and
the result says so (``GenerationResult.stream_consistent`` is False,
``stream_diverged_at`` the index) while carrying the result's own tokens and text.

Every result's signature is checked before it is handed over
(:func:`proto.result_signing.verify_result`): one that does not verify is refused
(:func:`agent.results.refusal`), an unsigned one is accepted and marked unsigned, and an
error result becomes its typed :class:`proto.errors.DinetError`. When the agent reads the DHT
(``ReplyRouter.owners``, :mod:`agent.owners`), :meth:`ReplyRouter.receive` also asks whether a
valid signer owns the node id the result names: a known non-owner is refused
(:class:`agent.owners.SignerNotOwnerError`), anything else is handed over with
``signer_confirmed`` True or None (could not tell). With or without a DHT, a valid signer whose key the
named node id derives from (:func:`proto.node_identity.self_certifies`) is confirmed: that needs no lookup.

Kept apart from :mod:`agent.client` (connection, publishing, public API) so that this
logic, which decides what the user sees, is plain code on parsed messages, with no channel
or connection in it: synchronous but for the owner lookup, which sits behind the small
:class:`OwnerCheck` protocol. Acking is the consumer's job, not this module's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any, Protocol

from aio_pika.abc import AbstractIncomingMessage
from google.protobuf.message import DecodeError

from agent.config import AgentConfig
from agent.owners import not_owner_refusal
from agent.pending import PendingRequest
from agent.results import Chunk, chunk_from_proto, refusal, result_from_proto
from proto import errors, messages_pb2
from proto.node_identity import certification
from proto.result_signing import Verdict, verify_result

logger = logging.getLogger(__name__)

CHUNK_TYPES = frozenset({"TokenChunk", messages_pb2.TokenChunk.DESCRIPTOR.full_name})
CLOSED = object()  # queued to a pending request when the agent closes


class OwnerCheck(Protocol):
    """Whether ``signer_key`` owns ``node_id``'s DHT record (:meth:`agent.owners.OwnerDirectory.confirm`)."""

    async def confirm(self, node_id: str, signer_key: bytes) -> bool | None: ...


class Reporter(Protocol):
    """Hands what the agent saw of a finished request to the outcome reporter (never raises)."""

    def __call__(self, pending: PendingRequest, message: messages_pb2.InferenceResult | None, *,
                 deadline_passed: bool = ..., now: float | None = ..., verdict: Verdict = ...) -> None: ...


def stream_divergence(streamed: Sequence[int], answer: Sequence[int]) -> int | None:
    """Index of the first streamed token that is not ``answer``'s token at that place; None when the
    stream is a prefix of the answer (a stream longer than the answer diverges where the answer ends)."""
    for index, (seen, final) in enumerate(zip(streamed, answer, strict=False)):
        if seen != final:
            return index
    return None if len(streamed) <= len(answer) else len(answer)


class ReplyRouter:
    """Requests waiting for replies, by id; and the ids of finished ones, to drop their late replies."""

    def __init__(self, config: AgentConfig, report: Reporter) -> None:
        self.config = config
        self._report = report
        self.pending: dict[str, PendingRequest] = {}
        self._finished: dict[str, None] = {}  # insertion-ordered set of finished request ids
        self.duplicates_dropped = 0
        self.owners: OwnerCheck | None = None  # set by the agent when it reads the DHT; None = results unconfirmed

    def register(self, request_id: str) -> PendingRequest:
        """A new request to wait for; :raises ValueError: for an id this agent used already."""
        if request_id in self.pending or request_id in self._finished:
            raise ValueError(f"request id {request_id!r} was already used by this agent")
        pending = PendingRequest(request_id)
        self.pending[request_id] = pending
        return pending

    def forget(self, request_id: str) -> None:
        """The request is over (answered, failed or given up): later replies for it are duplicates."""
        self.pending.pop(request_id, None)
        self._finished[request_id] = None
        while len(self._finished) > self.config.remembered_requests:
            self._finished.pop(next(iter(self._finished)))

    def cancel_all(self) -> None:
        """The agent is closing: every request still waiting ends (with :data:`CLOSED`)."""
        for pending in self.pending.values():
            pending.items.put_nowait(CLOSED)
        self.pending.clear()

    def dispatch(self, message: AbstractIncomingMessage) -> None:
        """Parse one reply and hand it to its request, with no owner check (``signer_confirmed`` None)."""
        parsed = self._parse(message)
        if parsed is not None:
            self._handle(*parsed)

    async def receive(self, message: AbstractIncomingMessage) -> None:
        """:meth:`dispatch`, plus, for a validly signed result when :attr:`owners` is set, the (bounded) check
        that its signer owns the node it names before it is handed over."""
        parsed = self._parse(message)
        if parsed is None:
            return
        pending, reply = parsed
        if self.owners is None or not isinstance(reply, messages_pb2.InferenceResult):
            self._handle(pending, reply)
            return
        verdict = verify_result(reply)
        confirmed = await self.owners.confirm(reply.node_id, reply.signer_key) if verdict is Verdict.VALID else None
        if self.pending.get(pending.request_id) is not pending:  # another copy settled it while we looked
            self.duplicates_dropped += 1
            return
        self._on_result(pending, reply, verdict=verdict, confirmed=confirmed)

    def _parse(self, message: AbstractIncomingMessage) -> tuple[PendingRequest, Any] | None:
        """The reply and its waiting request; None (logged) when unparsable, finished or unknown."""
        is_chunk = message.type in CHUNK_TYPES
        try:
            parsed: Any = (messages_pb2.TokenChunk if is_chunk else messages_pb2.InferenceResult).FromString(
                message.body
            )
        except DecodeError:
            logger.warning("dropping an unparsable reply (type %r, %d bytes)", message.type, len(message.body))
            return None
        pending = self.pending.get(parsed.request_id)
        if pending is None:
            self.duplicates_dropped += 1
            logger.debug("dropping a reply for finished or unknown request %s", parsed.request_id)
            return None
        return pending, parsed

    def _handle(self, pending: PendingRequest, reply: Any) -> None:
        if isinstance(reply, messages_pb2.TokenChunk):
            self._on_chunk(pending, reply)
        else:
            self._on_result(pending, reply)

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
        pending.streamed_token_ids.extend(chunk.token_ids)
        pending.items.put_nowait(chunk)

    def _on_result(self, pending: PendingRequest, message: messages_pb2.InferenceResult, *,
                   verdict: Verdict | None = None, confirmed: bool | None = None) -> None:
        """``verdict``: the signature check, when the caller made it; ``confirmed``: whether the signer owns the
        named node (:func:`agent.owners.signer_confirmation`; None = not known)."""
        self.forget(pending.request_id)
        verdict = verify_result(message) if verdict is None else verdict
        if verdict is Verdict.VALID and confirmed is None:
            # the node id is a hash of the signer's key (True) or of another key (False): no DHT needed to tell
            confirmed = certification(message.node_id, message.signer_key)
        if verdict is Verdict.INVALID:  # a bad answer from whoever sent it: never handed over as the node's
            logger.warning("refusing the result of request %s: it names node %r but its signature does not verify",
                           pending.request_id, message.node_id)
            pending.items.put_nowait(refusal(message))
            self._report(pending, message, verdict=verdict)
            return
        if verdict is Verdict.VALID and confirmed is False:  # a validly signed answer from an impostor
            logger.warning("refusing the result of request %s: it names node %r, whose id or DHT record belongs to "
                           "another key than the one that signed it", pending.request_id, message.node_id)
            pending.items.put_nowait(not_owner_refusal(pending.request_id, message.node_id))
            self._report(pending, message, verdict=verdict)  # signed evidence: the broker judges it on its own
            return
        if verdict is Verdict.UNSIGNED:
            logger.debug("result of request %s from node %r is unsigned", pending.request_id, message.node_id)
        if not message.ok:
            pending.items.put_nowait(errors.DinetError.from_proto(message.error))
            self._report(pending, message, verdict=verdict)
            return
        now = time.perf_counter()
        diverged_at = stream_divergence(pending.streamed_token_ids, message.token_ids)
        if diverged_at is not None:
            logger.warning(
                "request %s: the streamed tokens disagree with the %s result from token %d on (chunks from node %r, "
                "result from node %r; a redelivered task resampled, or chunks altered on the way): the result's "
                "tokens and text are the answer, not what was streamed", pending.request_id,
                "signed" if verdict is Verdict.VALID else "unsigned", diverged_at, pending.node_id, message.node_id)
        # after a divergence, the result's tail would continue a stream that is not the answer: none is handed over
        tail = tuple(message.token_ids[pending.next_index :]) if diverged_at is None else ()
        if tail:  # tokens the stream did not bring (chunks lost or out of order): hand them over now
            text = message.text[len(pending.streamed_text) :] if message.text.startswith(pending.streamed_text) else ""
            pending.items.put_nowait(Chunk(pending.request_id, pending.next_index, tail, text, message.node_id))
            if pending.first_token_at is None:
                pending.first_token_at = now
        submitted = pending.submitted or now
        first = pending.first_token_at if pending.first_token_at is not None else now
        pending.items.put_nowait(result_from_proto(message, ttft_s=first - submitted, total_s=now - submitted,
                                                   signed=verdict is Verdict.VALID, signer_confirmed=confirmed,
                                                   stream_diverged_at=diverged_at))
        self._report(pending, message, now=now, verdict=verdict)
