"""The tokens an agent streamed must be the signed result's: when they are not, the caller is told.

Chunks are not signed, the final result is. The agent checks, when the result arrives, that the
tokens it already handed over are a prefix of the result's ``token_ids``. On a mismatch (a chunk
altered on the way, or a task redelivered to another node that sampled differently) the result
carries its own tokens and text, ``stream_consistent`` is False with the first differing index,
no tail chunk continues the wrong stream, a warning names the request, and the CLI says so.

Most tests drive :class:`agent.replies.ReplyRouter` with real protobuf messages (no broker);
one goes through the real RabbitMQ reply queue.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import aio_pika
import pytest
from hivemind.utils.crypto import RSAPrivateKey

from agent import Agent, AgentConfig
from agent.__main__ import closing_text
from agent.pending import PendingRequest
from agent.replies import ReplyRouter, stream_divergence
from agent.results import Chunk, GenerationResult
from proto import messages_pb2
from proto.result_signing import ResultSignatureError, ResultSigner
from proto.topology import Topology

TEXT = {5: "def", 6: " f", 7: "(x", 8: "):", 9: " pass", 99: " rm"}


@dataclass
class Delivered:
    """What :meth:`ReplyRouter.dispatch` reads of an AMQP delivery."""

    body: bytes
    type: str


@pytest.fixture(scope="module")
def signer() -> ResultSigner:
    return ResultSigner(RSAPrivateKey())


@pytest.fixture
def router() -> ReplyRouter:
    return ReplyRouter(AgentConfig(report_outcomes=False), lambda *args, **kwargs: None)


def chunk(request_id: str, index: int, ids: list[int], node_id: str = "node-a") -> Delivered:
    message = messages_pb2.TokenChunk(request_id=request_id, index=index, token_ids=ids,
                                      text="".join(TEXT[t] for t in ids), node_id=node_id)
    return Delivered(message.SerializeToString(), "TokenChunk")


def signed_result(signer: ResultSigner, request_id: str, ids: list[int], node_id: str = "node-a",
                  ) -> messages_pb2.InferenceResult:
    return signer.sign(messages_pb2.InferenceResult(
        request_id=request_id, ok=True, node_id=node_id, group="g1", method="baseline", token_ids=ids,
        text="".join(TEXT[t] for t in ids), finish_reason="length",
        timing=messages_pb2.Timing(new_tokens=len(ids)),
    ))


def result_delivery(result: messages_pb2.InferenceResult) -> Delivered:
    return Delivered(result.SerializeToString(), "InferenceResult")


def run(router: ReplyRouter, request_id: str, *deliveries: Delivered) -> tuple[list[Chunk], Any]:
    """Register ``request_id``, dispatch the replies, return the chunks handed over and the last item."""
    pending: PendingRequest = router.register(request_id)
    for delivery in deliveries:
        router.dispatch(delivery)  # type: ignore[arg-type]
    items = []
    while not pending.items.empty():
        items.append(pending.items.get_nowait())
    return [i for i in items if isinstance(i, Chunk)], items[-1]


def streamed_ids(chunks: list[Chunk]) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


def test_divergence_is_the_first_differing_index_or_where_a_longer_stream_passes_the_answer() -> None:
    assert stream_divergence([], [5, 6]) is None
    assert stream_divergence([5, 6], [5, 6, 7]) is None
    assert stream_divergence([5, 6, 7], [5, 6, 7]) is None
    assert stream_divergence([5, 99, 7], [5, 6, 7]) == 1
    assert stream_divergence([5, 6, 7, 8], [5, 6]) == 2


def test_a_consistent_stream_ends_in_a_consistent_result(
    router: ReplyRouter, signer: ResultSigner, caplog: pytest.LogCaptureFixture
) -> None:
    chunks, result = run(router, "r-ok", chunk("r-ok", 0, [5, 6]), chunk("r-ok", 2, [7, 8, 9]),
                         result_delivery(signed_result(signer, "r-ok", [5, 6, 7, 8, 9])))
    assert streamed_ids(chunks) == [5, 6, 7, 8, 9]
    assert isinstance(result, GenerationResult) and result.signed
    assert result.stream_consistent and result.stream_diverged_at is None
    assert result.to_dict()["stream_consistent"] is True and "MISMATCH" not in result.summary()
    assert "disagree" not in caplog.text


def test_an_altered_chunk_is_flagged_and_the_signed_tokens_are_the_answer(
    router: ReplyRouter, signer: ResultSigner, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="agent.replies")
    chunks, result = run(router, "r-altered", chunk("r-altered", 0, [5, 99]),  # was [5, 6] at the node
                         result_delivery(signed_result(signer, "r-altered", [5, 6, 7, 8])))
    assert streamed_ids(chunks) == [5, 99]  # handed over before the result could say otherwise; no tail follows
    assert isinstance(result, GenerationResult) and result.signed
    assert not result.stream_consistent and result.stream_diverged_at == 1
    assert result.token_ids == (5, 6, 7, 8) and result.text == "def f(x):"
    assert result.to_dict()["stream_consistent"] is False and result.to_dict()["stream_diverged_at"] == 1
    assert "STREAM MISMATCH at token 1" in result.summary()
    (record,) = [r for r in caplog.records if "disagree" in r.getMessage()]
    assert record.levelno == logging.WARNING
    assert "r-altered" in record.getMessage() and "from token 1 on" in record.getMessage()


def test_a_stream_redelivered_from_a_node_that_sampled_otherwise_is_flagged(
    router: ReplyRouter, signer: ResultSigner
) -> None:
    """Node A streams 3 tokens and dies; node B recomputes with unseeded sampling and answers."""
    chunks, result = run(
        router, "r-redelivered",
        chunk("r-redelivered", 0, [5, 6, 7], node_id="node-a"),
        chunk("r-redelivered", 0, [5, 6, 9], node_id="node-b"),  # seen already: dropped
        chunk("r-redelivered", 3, [8], node_id="node-b"),
        result_delivery(signed_result(signer, "r-redelivered", [5, 6, 9, 8], node_id="node-b")),
    )
    assert streamed_ids(chunks) == [5, 6, 7, 8]  # what the caller saw: a mix that neither node produced
    assert not result.stream_consistent and result.stream_diverged_at == 2
    assert result.token_ids == (5, 6, 9, 8) and result.node_id == "node-b"


def test_a_redelivered_stream_with_the_same_tokens_stays_consistent(router: ReplyRouter, signer: ResultSigner) -> None:
    chunks, result = run(
        router, "r-greedy",
        chunk("r-greedy", 0, [5, 6], node_id="node-a"),
        chunk("r-greedy", 0, [5, 6, 7], node_id="node-b"),  # partly seen: only token 7 is new
        result_delivery(signed_result(signer, "r-greedy", [5, 6, 7, 8], node_id="node-b")),
    )
    assert streamed_ids(chunks) == [5, 6, 7, 8] and [c.index for c in chunks] == [0, 2, 3]
    assert result.stream_consistent and result.node_id == "node-b"


def test_a_stream_longer_than_the_result_is_flagged_where_the_result_ends(
    router: ReplyRouter, signer: ResultSigner
) -> None:
    chunks, result = run(router, "r-long", chunk("r-long", 0, [5, 6, 7, 8]),
                         result_delivery(signed_result(signer, "r-long", [5, 6])))
    assert streamed_ids(chunks) == [5, 6, 7, 8]
    assert not result.stream_consistent and result.stream_diverged_at == 2 and result.token_ids == (5, 6)


def test_duplicate_lost_and_out_of_order_chunks_still_end_consistent(
    router: ReplyRouter, signer: ResultSigner
) -> None:
    chunks, result = run(
        router, "r-lossy",
        chunk("r-lossy", 0, [5, 6]),
        chunk("r-lossy", 0, [5, 6]),  # duplicate
        chunk("r-lossy", 3, [8]),  # arrives before the chunk at 2, which is lost: the result fills the gap
        result_delivery(signed_result(signer, "r-lossy", [5, 6, 7, 8, 9])),
    )
    assert [(c.index, c.token_ids) for c in chunks] == [(0, (5, 6)), (2, (7, 8, 9))]
    assert chunks[-1].text == "(x): pass"
    assert result.stream_consistent and result.token_ids == (5, 6, 7, 8, 9)
    assert router.duplicates_dropped == 1


def test_a_result_whose_signature_fails_is_refused_as_before(
    router: ReplyRouter, signer: ResultSigner, caplog: pytest.LogCaptureFixture
) -> None:
    result = signed_result(signer, "r-forged", [5, 6, 7])
    result.token_ids[1] = 99  # changed after signing
    chunks, refused = run(router, "r-forged", chunk("r-forged", 0, [5, 6]), result_delivery(result))
    assert isinstance(refused, ResultSignatureError) and streamed_ids(chunks) == [5, 6]
    assert "signature does not verify" in caplog.text and "disagree" not in caplog.text


def test_the_cli_says_visibly_that_the_streamed_text_was_not_the_answer(
    router: ReplyRouter, signer: ResultSigner
) -> None:
    _, good = run(router, "r-cli-ok", chunk("r-cli-ok", 0, [5, 6]),
                  result_delivery(signed_result(signer, "r-cli-ok", [5, 6, 7])))
    assert closing_text(good, "def f") == f"(x\n-- {good.summary()}\n"  # the rest of the answer, the summary
    _, bad = run(router, "r-cli-bad", chunk("r-cli-bad", 0, [5, 99]),
                 result_delivery(signed_result(signer, "r-cli-bad", [5, 6, 7])))
    lines = closing_text(bad, "def rm").split("\n")
    assert lines[1].startswith("-- WARNING: the streamed text above is NOT the answer")
    assert "signed result at token 1" in lines[1]
    assert lines[2] == "def f(x"  # the whole signed answer, on its own line
    assert lines[3].startswith("-- 3 tokens") and lines[3].endswith("STREAM MISMATCH at token 1")


async def test_an_altered_chunk_through_rabbitmq_is_flagged_on_the_result(
    amqp_url: str, topology: Topology, signer: ResultSigner
) -> None:
    async with Agent(amqp_url, namespace=topology.namespace, config=AgentConfig(report_outcomes=False)) as agent:
        generation = agent.generate(model="tiny", prompt="hello", max_new_tokens=3, request_id="r-amqp", timeout=10)
        await generation.start()
        connection = await aio_pika.connect(amqp_url)
        try:
            channel = await connection.channel()
            for delivery in (chunk("r-amqp", 0, [5, 99]), result_delivery(signed_result(signer, "r-amqp", [5, 6, 7]))):
                await channel.default_exchange.publish(aio_pika.Message(delivery.body, type=delivery.type),
                                                       routing_key=agent.reply_queue_name)
        finally:
            await connection.close()
        chunks = [c async for c in generation]
        result = await asyncio.wait_for(generation.result(), timeout=10)
    assert streamed_ids(chunks) == [5, 99]
    assert result.signed and not result.stream_consistent and result.stream_diverged_at == 1
    assert result.token_ids == (5, 6, 7) and result.text == "def f(x"
