"""A node signs its final results with its DHT record key; the agent refuses a result that does not verify.

The unit tests pin the signed form (which fields, that each one counts, that the key is the one
owning the node's DHT records). The agent tests use a real RabbitMQ and the real agent client;
a stand-in "network" publishes results into the agent's reply queue, as any node (or anyone
with AMQP access) could. End to end, a real task worker on the tiny model answers through a
stand-in broker (:class:`tests.helpers_worker.Forwarder`).
"""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import Callable
from pathlib import Path

import aio_pika
import pytest
from hivemind.utils.crypto import RSAPrivateKey

from agent import Agent, GenerationResult
from agent.outcomes import Observation
from node.daemon import NodeConfig, node_signer, run_node
from node.dedup import CompletedLedger
from node.node_id import NodeKeyError, stable_node_id
from proto import messages_pb2
from proto.dht_schema import make_record_validators, owner_subkey, subkey_owner_key
from proto.node_identity import self_certifies
from proto.result_signing import (
    ResultSignatureError,
    ResultSigner,
    Verdict,
    answer_digest,
    signed_bytes,
    verify_result,
)
from proto.topology import Topology
from tests.helpers_worker import Forwarder, running_worker, tiny_engine, tiny_tokenizer  # noqa: F401 (fixtures)

Tamper = Callable[[messages_pb2.InferenceResult], None]


def answer(request_id: str = "r1", node_id: str = "node-a", *, ok: bool = True) -> messages_pb2.InferenceResult:
    result = messages_pb2.InferenceResult(
        request_id=request_id, ok=ok, node_id=node_id, group="g1", method="baseline",
        token_ids=[5, 6, 7] if ok else [], text="def f" if ok else "", finish_reason="length" if ok else "error",
        timing=messages_pb2.Timing(new_tokens=3 if ok else 0),
    )
    if not ok:
        result.error.code = 11  # type: ignore[assignment]
        result.error.message = "broken"
    return result


@pytest.fixture(scope="module")
def impostor() -> ResultSigner:
    return ResultSigner(RSAPrivateKey())


# -- the signed form ------------------------------------------------------------------------------
def test_a_nodes_result_verifies_with_the_key_that_owns_its_dht_records() -> None:
    signer = ResultSigner.process_wide()
    result = signer.sign(answer())
    assert verify_result(result) is Verdict.VALID
    assert verify_result(signer.sign(answer(ok=False))) is Verdict.VALID  # error results are signed too
    # the DHT peer of this process stores its records under a subkey naming this very key
    subkey = owner_subkey(make_record_validators(), "peer-x")
    assert subkey_owner_key(subkey) == result.signer_key == signer.public_key


SIGNED_FIELDS: dict[str, Tamper] = {
    "request_id": lambda r: setattr(r, "request_id", "r2"),
    "node_id": lambda r: setattr(r, "node_id", "node-b"),
    "group": lambda r: setattr(r, "group", "g2"),
    "ok": lambda r: setattr(r, "ok", False),
    "token_ids": lambda r: r.token_ids.append(8),
    "text": lambda r: setattr(r, "text", "def g"),
    "finish_reason": lambda r: setattr(r, "finish_reason", "eos"),
}


@pytest.mark.parametrize("field", sorted(SIGNED_FIELDS))
def test_changing_any_signed_field_breaks_the_signature(field: str) -> None:
    result = ResultSigner.process_wide().sign(answer())
    SIGNED_FIELDS[field](result)
    assert verify_result(result) is Verdict.INVALID


def test_changing_the_error_code_of_an_error_result_breaks_the_signature() -> None:
    result = ResultSigner.process_wide().sign(answer(ok=False))
    result.error.code = 13  # type: ignore[assignment]  # INTERNAL instead of NODE_FAILURE
    assert verify_result(result) is Verdict.INVALID


def test_timing_and_method_are_not_signed_and_unsigned_results_are_told_apart(impostor: ResultSigner) -> None:
    result = ResultSigner.process_wide().sign(answer())
    result.timing.total_s, result.method = 9.0, "speculative"  # measurements, not the answer
    assert verify_result(result) is Verdict.VALID
    assert verify_result(answer()) is Verdict.UNSIGNED
    half = answer()
    half.signer_key = impostor.public_key  # a key without a signature is not "unsigned"
    assert verify_result(half) is Verdict.INVALID
    swapped = impostor.sign(answer())
    swapped.signer_key = ResultSigner.process_wide().public_key  # someone else's key on the impostor's signature
    assert verify_result(swapped) is Verdict.INVALID
    garbage = impostor.sign(answer())
    garbage.signer_key = b"ssh-rsa not-a-key"
    assert verify_result(garbage) is Verdict.INVALID


def test_fields_are_length_prefixed_so_boundaries_cannot_shift() -> None:
    a = signed_bytes(request_id="r", node_id="ab", group="c", ok=True, error_code=0, digest=b"d" * 32)
    b = signed_bytes(request_id="r", node_id="a", group="bc", ok=True, error_code=0, digest=b"d" * 32)
    assert a != b
    assert answer_digest([1, 2], "x", "length") != answer_digest([1], "\x00\x00\x00\x02x", "length")
    # an ok result signs error code 0 whatever the (unused) error field says
    assert signed_bytes(request_id="r", node_id="n", group="g", ok=True, error_code=11, digest=b"d" * 32) == \
        signed_bytes(request_id="r", node_id="n", group="g", ok=True, error_code=0, digest=b"d" * 32)


def test_a_node_without_a_dht_keeps_its_key_across_restarts(tmp_path: Path) -> None:
    path = tmp_path / "result_key.der"
    first = ResultSigner.load_or_create(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    again = ResultSigner.load_or_create(path)
    assert again.public_key == first.public_key
    assert verify_result(again.sign(answer())) is Verdict.VALID


def test_a_node_signs_with_the_key_in_its_state_dir_and_is_named_after_it(tmp_path: Path) -> None:
    kept = node_signer(tmp_path)
    assert kept.public_key != ResultSigner.process_wide().public_key  # not the per-process DHT key
    assert node_signer(tmp_path).public_key == kept.public_key  # the same after a restart
    node_id = stable_node_id(tmp_path, kept.public_key)
    assert self_certifies(node_id, kept.public_key)
    assert stable_node_id(tmp_path, kept.public_key) == node_id


def test_an_unreadable_node_key_stops_the_node_with_a_clear_error_and_is_left_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key_file = tmp_path / "result_key.der"
    key_file.write_bytes(b"not a key")
    with pytest.raises(NodeKeyError, match=r"result_key\.der cannot be read"):
        node_signer(tmp_path)
    config = NodeConfig(model=str(tmp_path / "no-model-needed"), model_name="m", group="g", state_dir=tmp_path)
    assert run_node(config) == 2  # before any model, broker or DHT is touched
    assert "dinet-node run: error: the node's key" in capsys.readouterr().err
    assert key_file.read_bytes() == b"not a key"  # its identity: never replaced behind the operator's back


def test_a_node_whose_state_dir_is_held_by_another_stops_with_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    held = CompletedLedger(tmp_path)  # what a running node holds
    try:
        config = NodeConfig(model=str(tmp_path / "no-model-needed"), model_name="m", group="g", state_dir=tmp_path)
        assert run_node(config) == 2
    finally:
        held.close()
    assert "in use by another running node; give each node its own --state-dir" in capsys.readouterr().err


def test_nodes_of_one_group_serving_different_spans_get_their_own_default_state_dirs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    whole = NodeConfig(model="m", model_name="m", group="cpu", namespace="ns")
    first = NodeConfig(model="m", model_name="m", group="cpu", namespace="ns", blocks=(0, 2))
    second = NodeConfig(model="m", model_name="m", group="cpu", namespace="ns", blocks=(2, 4))
    assert whole.resolved_state_dir() == tmp_path / "dinet" / "ns-cpu"  # as before
    assert first.resolved_state_dir() == tmp_path / "dinet" / "ns-cpu-blocks-0-2"
    assert second.resolved_state_dir() == tmp_path / "dinet" / "ns-cpu-blocks-2-4"


def test_a_state_dir_from_before_key_derived_ids_keeps_its_recorded_id(tmp_path: Path) -> None:
    (tmp_path / "node_id").write_text("host-a1b2c3\n")
    assert stable_node_id(tmp_path, node_signer(tmp_path).public_key) == "host-a1b2c3"


# -- the agent ------------------------------------------------------------------------------------
class Seen:
    """Stands in for the agent's outcome reporter: keeps what would have gone to the telemetry stream."""

    def __init__(self) -> None:
        self.reports: list[messages_pb2.OutcomeReport] = []

    def report(self, channel: object, observation: Observation) -> None:
        self.reports.append(observation.to_proto("agent-x"))

    async def flush(self, timeout_s: float) -> None:
        return None


async def _answer_with(agent: Agent, result: messages_pb2.InferenceResult) -> asyncio.Future[GenerationResult]:
    """Submit a request, then publish ``result`` for it into the agent's reply queue as a node would."""
    generation = agent.generate(model="tiny", prompt="hello", max_new_tokens=3, request_id=result.request_id,
                                timeout=10)
    await generation.start()
    connection = await aio_pika.connect(agent.config.amqp_url)
    try:
        channel = await connection.channel()
        await channel.default_exchange.publish(
            aio_pika.Message(result.SerializeToString(), type="InferenceResult"), routing_key=agent.reply_queue_name)
    finally:
        await connection.close()
    return asyncio.ensure_future(generation.result())


TAMPERED: dict[str, Tamper] = {
    "text changed on the way": lambda r: setattr(r, "text", "rm -rf /"),
    "node_id swapped after signing": lambda r: setattr(r, "node_id", "node-b"),
    "signature made by another key": lambda r: setattr(r, "signature", _other_key_signature(r)),
}


def _other_key_signature(result: messages_pb2.InferenceResult) -> bytes:
    copy = messages_pb2.InferenceResult()
    copy.CopyFrom(result)
    return ResultSigner(RSAPrivateKey()).sign(copy).signature


@pytest.mark.parametrize("how", sorted(TAMPERED))
async def test_the_agent_refuses_a_tampered_result_and_reports_no_signature(
    amqp_url: str, topology: Topology, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with Agent(amqp_url, namespace=topology.namespace) as agent:
        agent.outcomes = seen = Seen()  # type: ignore[assignment]
        result = ResultSigner.process_wide().sign(answer(request_id="tampered-1"))
        TAMPERED[how](result)
        with pytest.raises(ResultSignatureError) as refused:
            await (await _answer_with(agent, result))
    assert refused.value.recoverable and refused.value.code_name == "NODE_FAILURE"
    assert "signature does not verify" in caplog.text
    (report,) = seen.reports  # a bad answer from that node: a failure, with no signature for a broker to credit
    assert report.answered and not report.ok and report.error_code == 11
    assert (report.signer_key, report.signature, report.answer_digest) == (b"", b"", b"")


async def test_the_agent_accepts_an_unsigned_result_but_marks_it(amqp_url: str, topology: Topology) -> None:
    async with Agent(amqp_url, namespace=topology.namespace) as agent:
        agent.outcomes = seen = Seen()  # type: ignore[assignment]
        result = await (await _answer_with(agent, answer(request_id="unsigned-1")))
    assert result.text == "def f" and not result.signed and result.to_dict()["signed"] is False
    (report,) = seen.reports
    assert report.ok and report.signer_key == b""


async def test_a_real_nodes_answer_reaches_the_agent_signed(
    amqp_url: str, topology: Topology, tiny_engine, tiny_tokenizer  # noqa: F811
) -> None:
    connection = await aio_pika.connect_robust(amqp_url)
    forwarder = Forwarder(topology)
    try:
        await forwarder.start(connection)
        async with running_worker(connection, topology, tiny_engine, tiny_tokenizer, node_id="node-a"), \
                Agent(amqp_url, namespace=topology.namespace) as agent:
            agent.outcomes = seen = Seen()  # type: ignore[assignment]
            result = await agent.complete(model="tiny", prompt="def parse(text):", max_new_tokens=6, timeout=60)
    finally:
        await forwarder.close()
        await connection.close()
    assert result.signed and result.signer_key == ResultSigner.process_wide().public_key
    (report,) = seen.reports  # forwarded for the brokers: key, signature and the answer's digest
    assert report.signer_key == result.signer_key and report.signature
    assert report.answer_digest == answer_digest(result.token_ids, result.text, result.finish_reason)
