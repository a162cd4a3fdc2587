"""Who may stand for a node id, once ids can certify themselves (proto/node_identity.py).

A node id that is the peer id of the key signing the node's results needs no DHT: the agent confirms such a
signer, and the broker credits it, whatever the DHT view says. Where the id certifies nobody (ids from before,
or an id claimed by several keys none of which it derives from), the broker credits nobody for it rather than
whichever claimant its DHT view listed last, and says so in ``dinet-broker status``. Stream entries go through
:meth:`TelemetryConsumer.handle` as in tests/test_broker_result_attribution.py; agent replies through
:class:`agent.replies.ReplyRouter` as in tests/test_agent_owners.py. Real RSA keys throughout.
"""

from __future__ import annotations

import logging

import pytest
from hivemind.utils.crypto import RSAPrivateKey

from agent.owners import SignerNotOwnerError, signer_confirmation
from agent.results import GenerationResult
from broker.directory import GroupDirectory
from broker.evidence import AMBIGUOUS_OWNER
from broker.status import format_status
from proto.node_identity import peer_id_of
from proto.records import NodeRecord
from proto.result_signing import ResultSigner
from tests.test_agent_owners import Owners, make_router, receive
from tests.test_agent_stream_consistency import result_delivery, signed_result
from tests.test_broker_result_attribution import T0, Requests, consumer

AMBIGUOUS = "several keys claim the named node's DHT record"


@pytest.fixture(scope="module")
def keys() -> tuple[ResultSigner, ResultSigner, ResultSigner]:
    return ResultSigner(RSAPrivateKey()), ResultSigner(RSAPrivateKey()), ResultSigner(RSAPrivateKey())


def id_of(signer: ResultSigner) -> str:
    node_id = peer_id_of(signer.public_key)
    assert node_id is not None
    return node_id


def directory_with(claims: list[tuple[str, bytes]]) -> GroupDirectory:
    directory = GroupDirectory()
    records = [NodeRecord(peer_id=node, address="", group="g", models=("tiny",), start_block=0, end_block=2)
               for node, _ in claims]
    directory.set_dht_records(records, claims=claims)
    return directory


# --- broker ---------------------------------------------------------------------------------------------------

def test_the_key_an_id_derives_from_owns_it_however_many_keys_claim_it(keys: tuple[ResultSigner, ...]) -> None:
    victim, impostor, _ = keys
    node = id_of(victim)
    directory = directory_with([(node, impostor.public_key), (node, victim.public_key)])
    assert directory.owner_key(node) == victim.public_key and directory.ambiguous_nodes() == []


def test_an_id_several_keys_claim_and_none_derives_from_is_ambiguous(
    keys: tuple[ResultSigner, ...], caplog: pytest.LogCaptureFixture
) -> None:
    a, b, _ = keys
    with caplog.at_level(logging.WARNING, logger="broker.directory"):
        directory = directory_with([("old-id", a.public_key), ("old-id", b.public_key), ("solo", a.public_key)])
    assert directory.owner_key("old-id") == AMBIGUOUS_OWNER and directory.ambiguous_nodes() == ["old-id"]
    assert directory.owner_key("solo") == a.public_key and directory.owner_key("unknown") is None
    assert "2 keys claim node old-id" in caplog.text


def test_nobody_is_credited_for_an_ambiguous_id_not_even_the_first_signer(keys: tuple[ResultSigner, ...]) -> None:
    a, b, _ = keys
    directory = directory_with([("old-id", a.public_key), ("old-id", b.public_key)])
    target = consumer(directory.owner_key)
    requests = Requests(target)
    requests.answered("old-id", a, ok=True)
    requests.answered("old-id", b, ok=False)
    assert target.ledger.table(T0 + 10) == [] and target.ledger.ignored[AMBIGUOUS] == 2


def test_a_self_certified_signer_is_credited_whatever_owner_the_dht_view_names(
    keys: tuple[ResultSigner, ...]
) -> None:
    victim, impostor, _ = keys
    node = id_of(victim)
    for owner_key in ({node: impostor.public_key}.get, {node: AMBIGUOUS_OWNER}.get):
        target = consumer(owner_key)
        Requests(target).answered(node, victim, ok=True)
        (row,) = target.ledger.table(T0 + 10)
        assert (row.node_id, row.reports, row.failures) == (node, 1, 0.0) and not target.ledger.ignored


def test_with_no_dht_view_an_impostor_is_never_credited_under_a_key_derived_id(
    keys: tuple[ResultSigner, ...]
) -> None:
    victim, impostor, _ = keys
    node = id_of(victim)
    target = consumer()  # no owners known: before key-derived ids, the first signer of an id was trusted
    requests = Requests(target)
    requests.answered(node, impostor, ok=True)  # first, yet not credited: the id derives from another key
    requests.answered(node, victim, ok=True)
    requests.answered(node, impostor, ok=False)  # cannot blame the victim either
    (row,) = target.ledger.table(T0 + 10)
    assert (row.reports, row.failures) == (1, 0.0)
    assert target.ledger.ignored == {"the named node's id derives from another key": 2}


def test_ids_of_other_forms_keep_trusting_the_first_signer_with_no_dht_view(keys: tuple[ResultSigner, ...]) -> None:
    first, second, _ = keys
    target = consumer()
    requests = Requests(target)
    requests.answered("host-a1b2c3", first, ok=True)  # a legacy id: nothing in it names a key
    requests.answered("host-a1b2c3", second, ok=False)
    (row,) = target.ledger.table(T0 + 10)
    assert (row.reports, row.failures) == (1, 0.0)
    assert target.ledger.ignored == {"signer is not the key already credited for the named node": 1}


def test_broker_status_names_the_ambiguous_ids() -> None:
    status = {"namespace": "n", "time": T0, "window_s": 60.0, "request_queues": [], "groups": [],
              "dead_letters": {"queue": "dl", "messages": 0, "consumers": 0, "exists": True},
              "rates": {"completed_per_s": 0, "failed_per_s": 0}, "telemetry_reports": 0, "schedulers": [],
              "reputation_threshold": 0.3, "ambiguous_nodes": ["old-id"]}
    assert "Claimed by several DHT keys, credited to nobody: old-id" in format_status(status)


# --- agent ----------------------------------------------------------------------------------------------------

def test_the_agent_confirms_a_self_certified_signer_and_refuses_another_claimant(
    keys: tuple[ResultSigner, ...]
) -> None:
    victim, impostor, _ = keys
    node = id_of(victim)
    both = frozenset({victim.public_key, impostor.public_key})
    assert signer_confirmation(victim.public_key, None, node_id=node) is True  # no DHT needed
    assert signer_confirmation(victim.public_key, both, node_id=node) is True
    assert signer_confirmation(impostor.public_key, both, node_id=node) is False  # the id names the victim's key
    assert signer_confirmation(impostor.public_key, None, node_id=node) is False  # the id alone says it
    assert signer_confirmation(impostor.public_key, both, node_id="old-id") is None  # ids from before: as before


async def test_an_agent_without_a_dht_confirms_a_self_certified_result_and_refuses_an_impostor_of_it(
    keys: tuple[ResultSigner, ...]
) -> None:
    victim, impostor, _ = keys
    node = id_of(victim)
    router, _ = make_router(None)
    result = await receive(router, "s1", result_delivery(signed_result(victim, "s1", [5, 6], node_id=node)))
    assert isinstance(result, GenerationResult) and result.signer_confirmed is True
    other = await receive(router, "s2", result_delivery(signed_result(impostor, "s2", [5, 6], node_id=node)))
    assert isinstance(other, SignerNotOwnerError)  # the id derives from another key: no DHT needed to tell
    legacy = await receive(router, "s5", result_delivery(signed_result(impostor, "s5", [5, 6], node_id="old-id")))
    assert isinstance(legacy, GenerationResult) and legacy.signer_confirmed is None  # cannot tell: unconfirmed


async def test_a_dht_reading_agent_refuses_an_impostor_beside_a_self_certified_owner(
    keys: tuple[ResultSigner, ...]
) -> None:
    victim, impostor, _ = keys
    node = id_of(victim)
    router, _ = make_router(Owners({node: frozenset({victim.public_key, impostor.public_key})}))
    error = await receive(router, "s3", result_delivery(signed_result(impostor, "s3", [5], node_id=node)))
    assert isinstance(error, SignerNotOwnerError)
    result = await receive(router, "s4", result_delivery(signed_result(victim, "s4", [5], node_id=node)))
    assert isinstance(result, GenerationResult) and result.signer_confirmed is True
