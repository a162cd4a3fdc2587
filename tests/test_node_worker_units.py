"""Pure pieces of the worker, no RabbitMQ: the dedup ledger, validation, detokenizing, chunking."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from node.dedup import CompletedLedger, RecentIds, StateDirInUseError
from node.streaming import ChunkStream, IncrementalDetokenizer
from node.telemetry import shared_prefix_ratio
from node.validation import Limits, validate_prompt_tokens, validate_request
from proto import errors, messages_pb2
from tests.helpers_worker import tiny_tokenizer  # noqa: F401 (fixture)


def test_ledger_survives_a_restart_and_locks_its_directory(tmp_path: Path) -> None:
    ledger = CompletedLedger(tmp_path)
    ledger.add("a")
    ledger.add("b")
    with pytest.raises(StateDirInUseError, match="--state-dir"):
        CompletedLedger(tmp_path)
    ledger.close()
    again = CompletedLedger(tmp_path)
    assert "a" in again and "b" in again and "c" not in again
    again.close()


def test_ledger_forgets_old_entries_and_torn_lines(tmp_path: Path) -> None:
    (tmp_path / "completed.tsv").write_text(
        f"old\t{time.time() - 10 * 86400:.3f}\nnew\t{time.time():.3f}\ntorn\t17", encoding="utf-8"
    )
    ledger = CompletedLedger(tmp_path, retention_s=86400)
    assert "new" in ledger and "old" not in ledger
    ledger.close()
    assert (tmp_path / "completed.tsv").read_text(encoding="utf-8").count("\n") == 1  # compacted


def test_recent_ids_are_bounded() -> None:
    ids = RecentIds(max_entries=3)
    for name in "abcd":
        ids.add(name)
    assert "a" not in ids and "d" in ids and len(ids) == 3


def _request(**changes: object) -> messages_pb2.InferenceRequest:
    request = messages_pb2.InferenceRequest(request_id="r-1", model="tiny", prompt="hi", max_new_tokens=4)
    for key, value in changes.items():
        setattr(request, key, value)
    return request


def test_validation_names_the_problem() -> None:
    limits = Limits(model_name="tiny", max_new_tokens=64, max_positions=128)
    validate_request(_request(), limits)
    with pytest.raises(errors.UnknownModelError, match="serves model 'tiny'"):
        validate_request(_request(model="big"), limits)
    with pytest.raises(errors.MaxNewTokensError, match="between 1 and 64"):
        validate_request(_request(max_new_tokens=65), limits)
    hot = _request()
    hot.sampling.temperature = float("nan")
    with pytest.raises(errors.InvalidRequestError, match="temperature"):
        validate_request(hot, limits)
    with pytest.raises(errors.PromptTooLongError, match="at most 127"):
        validate_prompt_tokens(200, 4, limits)
    with pytest.raises(errors.MaxNewTokensError, match="at most 28 new tokens"):
        validate_prompt_tokens(100, 64, limits)


def test_detokenizer_never_splits_a_character(tiny_tokenizer) -> None:  # noqa: F811
    text = "naïve café — ünïcödé ✓ done"
    ids = tiny_tokenizer.encode(text)
    detok = IncrementalDetokenizer(tiny_tokenizer)
    pieces = [detok.push([t]) for t in ids] + [detok.flush()]
    assert "".join(pieces) == tiny_tokenizer.decode(ids)
    assert all("\ufffd" not in p for p in pieces)


async def test_chunk_stream_sends_the_first_token_alone_then_batches_while_a_publish_waits(
    tiny_tokenizer,  # noqa: F811
) -> None:
    sent: list[messages_pb2.TokenChunk] = []
    release = asyncio.Event()

    async def slow_publish(body: bytes, kind: str) -> None:
        assert kind == "TokenChunk"
        sent.append(messages_pb2.TokenChunk.FromString(body))
        await release.wait()

    stream = ChunkStream(request_id="r", node_id="n", detokenizer=IncrementalDetokenizer(tiny_tokenizer),
                         publish=slow_publish, max_tokens=4)
    stream.push(10)
    await asyncio.sleep(0.01)
    for token in range(11, 17):
        stream.push(token)
    release.set()
    await stream.finish()
    assert [list(c.token_ids) for c in sent] == [[10], [11, 12, 13, 14], [15, 16]]
    assert [c.index for c in sent] == [0, 1, 5]


def test_shared_prefix_ratio() -> None:
    assert shared_prefix_ratio((1, 2, 3, 4), [(1, 2, 9), (7,)]) == 0.5
    assert shared_prefix_ratio((1, 2), []) == 0.0


def test_the_method_run_is_the_one_asked_for_when_the_engine_runs_it_else_the_engines_default() -> None:
    from node.task_answer import choose_method

    local = ("baseline",)
    assert choose_method("baseline", local) == "baseline"
    assert choose_method("spec_ngram", local) == "baseline"
    assert choose_method("", local) == "baseline"
    vllm_built_for_prefix_caching = ("prefix_caching",)  # engine options are fixed: every request runs this way
    assert choose_method("baseline", vllm_built_for_prefix_caching) == "prefix_caching"
    assert choose_method("prefix_caching", vllm_built_for_prefix_caching) == "prefix_caching"
    vllm_batching = ("continuous_batching", "dynamic_batching")
    assert choose_method("dynamic_batching", vllm_batching) == "dynamic_batching"
    assert choose_method("spec_ngram", vllm_batching) == "continuous_batching"
