"""An outcome moves a node's reputation only when the node's own key signed the answer.

A node can put any node id on its results; the agent checks only that the signature verifies.
Brokers check who signed: the key must own the named node's DHT record (or, for a node with no
record in view, be the key already credited for it). Stream entries go through
:meth:`TelemetryConsumer.handle` as in tests/test_broker_evidence.py; the last test runs the real
broker, real task workers on the tiny model and the real agent over RabbitMQ.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import aio_pika
import pytest
from hivemind.utils.crypto import RSAPrivateKey

from agent import Agent
from broker.config import BrokerConfig
from broker.directory import GroupDirectory
from broker.evidence import EvidenceError, parse_outcome
from broker.reputation import ReputationLedger
from broker.service import BrokerService
from broker.telemetry import TelemetryConsumer
from proto.common_pb2 import ErrorCode
from proto.records import NodeRecord
from proto.result_signing import ResultSigner
from proto.telemetry import OUTCOME_REPORT, ROUTING_RECORD
from proto.topology import Topology
from tests.helpers_reputation import outcome_proto, record_proto
from tests.helpers_worker import GROUP, running_worker, tiny_engine, tiny_tokenizer  # noqa: F401 (fixtures)

T0 = 1.7e9
NOT_OWNER = "signer does not own the named node's DHT record"
NOT_KNOWN = "signer is not the key already credited for the named node"


@pytest.fixture(scope="module")
def victim() -> ResultSigner:
    return ResultSigner(RSAPrivateKey())


@pytest.fixture(scope="module")
def impostor() -> ResultSigner:
    return ResultSigner(RSAPrivateKey())


def consumer(owner_key: Callable[[str], bytes | None] | None = None) -> TelemetryConsumer:
    return TelemetryConsumer(Topology("unit"), ReputationLedger(owner_key=owner_key))


class Requests:
    """Routed requests answered in the name of some node, as the stream holds them."""

    def __init__(self, target: TelemetryConsumer) -> None:
        self.target = target
        self.n = 0

    def answered(self, node: str, signer: ResultSigner | None, *, ok: bool) -> None:
        self.n += 1
        rid, at = f"r{self.n}", T0 + self.n
        code = ErrorCode.ERROR_CODE_UNSPECIFIED if ok else ErrorCode.NODE_FAILURE
        report = outcome_proto(rid, node, group="g", ok=ok, code=code, signer=signer, signed=signer is not None)
        self.target.handle(record_proto(rid, group="g", at=at).SerializeToString(), 2 * self.n, ROUTING_RECORD)
        self.target.handle(report.SerializeToString(), 2 * self.n + 1, OUTCOME_REPORT)


def test_a_node_using_another_nodes_id_moves_nothing_for_it(victim: ResultSigner, impostor: ResultSigner) -> None:
    target = consumer({"victim": victim.public_key}.get)  # the DHT says who owns the victim's record
    requests = Requests(target)
    for _ in range(5):
        requests.answered("victim", impostor, ok=False)  # failures in the victim's name, signed by the impostor
    ledger, now = target.ledger, T0 + 10
    assert ledger.table(now) == [] and ledger.score("victim", now) == ledger.config.prior
    assert ledger.ignored[NOT_OWNER] == 5 and ledger.pending_routes == 0 and target.malformed == 0
    requests.answered("victim", victim, ok=True)  # the victim's own answer counts
    (row,) = ledger.table(now)
    assert (row.node_id, row.reports, row.failures) == ("victim", 1, 0.0) and row.successes > 0.9


def test_with_no_record_in_view_the_key_already_credited_for_a_node_keeps_it(
    victim: ResultSigner, impostor: ResultSigner
) -> None:
    target = consumer()  # static groups: no DHT owners at all
    requests = Requests(target)
    requests.answered("victim", victim, ok=True)
    for _ in range(5):
        requests.answered("victim", impostor, ok=False)
    ledger = target.ledger
    assert ledger.ignored[NOT_KNOWN] == 5 and ledger.eligible("victim", T0 + 10)
    assert [(r.reports, r.failures) for r in ledger.table(T0 + 10)] == [(1, 0.0)]


def test_a_record_owner_in_view_overrides_the_key_first_seen(victim: ResultSigner, impostor: ResultSigner) -> None:
    owners: dict[str, bytes] = {}
    target = consumer(owners.get)
    requests = Requests(target)
    requests.answered("victim", impostor, ok=True)  # the impostor was first, before the victim's record was seen
    owners["victim"] = victim.public_key
    requests.answered("victim", impostor, ok=False)
    requests.answered("victim", victim, ok=True)
    assert target.ledger.ignored[NOT_OWNER] == 1
    assert [(r.reports, r.failures) for r in target.ledger.table(T0 + 10)] == [(2, 0.0)]


def test_unsigned_answers_credit_no_node(victim: ResultSigner) -> None:
    target = consumer({"victim": victim.public_key}.get)
    requests = Requests(target)
    for _ in range(3):
        requests.answered("victim", None, ok=False)
    assert target.ledger.ignored["answer not signed"] == 3 and target.ledger.table(T0 + 10) == []


def test_an_agent_cannot_report_an_outcome_the_node_did_not_sign(victim: ResultSigner) -> None:
    report = outcome_proto("r1", "victim", group="g", ok=True, signer=victim)
    report.ok, report.error_code = False, ErrorCode.NODE_FAILURE  # defamation: "it failed"
    with pytest.raises(EvidenceError, match="signature does not verify"):
        parse_outcome(report.SerializeToString())
    target = consumer({"victim": victim.public_key}.get)
    target.handle(record_proto("r1", group="g", at=T0).SerializeToString(), 1, ROUTING_RECORD)
    target.handle(report.SerializeToString(), 2, OUTCOME_REPORT)
    assert target.malformed == 1 and target.ledger.table(T0 + 1) == []
    half = outcome_proto("r2", "victim", group="g", signer=victim)
    half.signature = b""
    with pytest.raises(EvidenceError, match="come together"):
        parse_outcome(half.SerializeToString())


async def _judged(service: BrokerService, n: int) -> None:
    deadline = time.monotonic() + 15
    while service.ledger.observed + sum(service.ledger.ignored.values()) < n and time.monotonic() < deadline:
        await asyncio.sleep(0.02)


async def test_a_real_node_claiming_another_nodes_id_gets_no_reputation_effect_on_it(
    amqp_url: str, topology: Topology, tiny_engine, tiny_tokenizer,  # noqa: F811
    victim: ResultSigner, impostor: ResultSigner,
) -> None:
    directory = GroupDirectory({GROUP: ("tiny",)})
    record = NodeRecord(peer_id="victim", address="", group=GROUP, models=("tiny",), start_block=0, end_block=2)
    directory.set_dht_records([record], owners={"victim": victim.public_key})  # as the DHT view would say
    config = BrokerConfig(amqp_url=amqp_url, namespace=topology.namespace, static_groups={GROUP: ("tiny",)})
    connection = await aio_pika.connect_robust(amqp_url)
    try:
        async with BrokerService(config, directory=directory) as service, \
                Agent(amqp_url, namespace=topology.namespace) as agent:
            async with running_worker(connection, topology, tiny_engine, tiny_tokenizer, node_id="victim",
                                      signer=impostor):
                for _ in range(3):
                    result = await agent.complete(model="tiny", prompt="who?", max_new_tokens=4, timeout=60)
                    assert result.node_id == "victim" and result.signer_key == impostor.public_key
                await _judged(service, 3)
            assert service.ledger.ignored[NOT_OWNER] == 3 and service.ledger.table(time.time()) == []
            async with running_worker(connection, topology, tiny_engine, tiny_tokenizer, node_id="victim",
                                      signer=victim):
                await agent.complete(model="tiny", prompt="me", max_new_tokens=4, timeout=60)
                await _judged(service, 4)
            (row,) = service.ledger.table(time.time())
            assert (row.node_id, row.reports, row.failures) == ("victim", 1, 0.0)
    finally:
        await connection.close()
