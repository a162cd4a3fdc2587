"""Streaming a request's tokens to its agent as ``TokenChunk`` messages while decoding goes on.

The first token leaves at once. After that, tokens that arrive while a chunk's publish
is still waiting for its confirm are gathered into the next chunk, so the batch size
follows the broker's round trip by itself: one token per chunk when decoding is slow,
several when it is fast, and decoding never waits for the network.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from proto import messages_pb2

logger = logging.getLogger(__name__)

# AMQP `type` property of the messages a reply queue receives (the protobuf message name):
CHUNK_TYPE = messages_pb2.TokenChunk.DESCRIPTOR.name  # "TokenChunk"
RESULT_TYPE = messages_pb2.InferenceResult.DESCRIPTOR.name  # "InferenceResult"


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas without splitting a UTF-8 character.

    Byte-level BPE tokens can end in the middle of a multi-byte character; such a tail
    decodes to U+FFFD and is held back until the next token completes it.
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix_offset = 0  # start of the window decoded for context
        self._read_offset = 0  # tokens before this index have been emitted as text

    def push(self, token_ids: list[int]) -> str:
        """Append tokens and return the newly complete text (possibly empty)."""
        self._ids.extend(token_ids)
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return full[len(prefix) :]
        return ""

    def flush(self) -> str:
        """Whatever text is still held back at the end of the stream."""
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        return full[len(prefix) :] if len(full) > len(prefix) else ""

    def _decode(self, ids: list[int]) -> str:
        return str(self._tokenizer.decode(ids, skip_special_tokens=True)) if ids else ""


PublishFn = Callable[[bytes, str], Awaitable[None]]  # (body, message type) -> confirmed publish


class ChunkStream:
    """Sends one request's tokens as ``TokenChunk`` messages, in order, from a background task.

    :param publish: publishes a body to the request's ``reply_to`` and returns once confirmed.
    :param max_tokens: most tokens in one chunk.
    """

    def __init__(
        self,
        *,
        request_id: str,
        node_id: str,
        detokenizer: IncrementalDetokenizer,
        publish: PublishFn,
        max_tokens: int = 32,
    ) -> None:
        self._request_id = request_id
        self._node_id = node_id
        self._detok = detokenizer
        self._publish = publish
        self._max_tokens = max(1, max_tokens)
        self._pending: list[int] = []
        self._sent = 0  # tokens already handed to the publisher
        self._wakeup = asyncio.Event()
        self._finished = False
        self.chunks_sent = 0
        self._task = asyncio.create_task(self._run(), name=f"chunks-{request_id}")

    def push(self, token_id: int) -> None:
        """Queue a token; raises the publisher's error if an earlier chunk could not be sent."""
        if self._task.done() and not self._finished:
            self._task.result()  # re-raises the publish failure
        self._pending.append(token_id)
        self._wakeup.set()

    async def finish(self) -> None:
        """Send what is left and wait for every chunk's confirm."""
        self._finished = True
        self._wakeup.set()
        await self._task

    async def abort(self) -> None:
        """Stop sending (tokens not yet sent are dropped) and wait for the sender to stop."""
        self._finished = True
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._task

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._pending:
                batch = self._pending[: self._max_tokens]
                del self._pending[: len(batch)]
                text = self._detok.push(batch)
                if self._finished and not self._pending:
                    text += self._detok.flush()
                chunk = messages_pb2.TokenChunk(
                    request_id=self._request_id,
                    index=self._sent,
                    token_ids=batch,
                    text=text,
                    node_id=self._node_id,
                )
                self._sent += len(batch)
                await self._publish(chunk.SerializeToString(), CHUNK_TYPE)
                self.chunks_sent += 1
            if self._finished:
                return
