"""An agent that reads the DHT tells the user whose answer it got: the signer must own the node id named.

A result's signature proves only that some key signed it; the node id is bound to a key by the owner
subkey of that node's DHT record. With a DHT view (``AgentConfig.initial_peers``) the agent:

- marks a result ``signer_confirmed=True`` when its signer is the one key owning the named node's record;
- refuses it (:class:`SignerNotOwnerError`, recoverable) when the owners are known and the signer is not
  one of them, after re-reading a fresh view (a node may have restarted with a new key);
- accepts it with ``signer_confirmed=None`` when it cannot tell: no DHT, no record, a slow or failing DHT,
  or several keys claiming the id with the signer among them.

Owner lookups are cached for ``owner_cache_s`` and never hold a result longer than ``owner_lookup_timeout_s``.
The decision logic is driven here with real signed protobuf results and a fake owner source; the real DHT,
nodes and RabbitMQ are in tests/test_e2e_result_attribution.py.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from hivemind.utils.crypto import RSAPrivateKey

from agent import Agent, AgentConfig
from agent.owners import (
    DhtJoinError,
    DhtOwnerSource,
    OwnerDirectory,
    OwnerMap,
    SignerNotOwnerError,
    check_initial_peers,
    owners_by_node,
    signer_confirmation,
)
from agent.replies import ReplyRouter
from agent.results import GenerationResult
from proto.records import NodeRecord
from proto.result_signing import ResultSignatureError, ResultSigner, Verdict
from tests.test_agent_stream_consistency import Delivered, result_delivery, signed_result

A, B, C = b"ssh-rsa key-a", b"ssh-rsa key-b", b"ssh-rsa key-c"
PEER = "/ip4/127.0.0.1/tcp/4001/p2p/12D3KooWRe5bkLFqU2Jt5ZEyVoTL7xFyBRGFHjnrSkUotK3ozu7W"


class FakeOwners:
    """An owner source whose map the test sets; counts fetches; can fail or hang."""

    def __init__(self, owners: OwnerMap, *, delay_s: float = 0.0, fail: bool = False) -> None:
        self.owners, self.delay_s, self.fail, self.fetches = owners, delay_s, fail, 0

    async def fetch(self) -> OwnerMap:
        self.fetches += 1
        await asyncio.sleep(self.delay_s)
        if self.fail:
            raise ConnectionError("DHT unreachable")
        return dict(self.owners)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_signer_is_confirmed_only_as_the_one_key_owning_the_record() -> None:
    assert signer_confirmation(A, frozenset({A})) is True
    assert signer_confirmation(B, frozenset({A})) is False  # owners known, signer not among them: an impostor
    assert signer_confirmation(C, frozenset({A, B})) is False
    assert signer_confirmation(A, frozenset({A, B})) is None  # two keys claim the id: the DHT cannot say which
    assert signer_confirmation(A, None) is None and signer_confirmation(A, frozenset()) is None  # no record
    assert signer_confirmation(b"", frozenset({A})) is None  # unsigned: nothing to confirm


def test_owner_keys_are_gathered_per_node_id() -> None:
    one, two = (NodeRecord(peer_id=n, address="", group="g", models=("tiny",), start_block=0, end_block=1)
                for n in ("n1", "n2"))
    assert owners_by_node([(one, A), (two, B), (one, C)]) == {"n1": frozenset({A, C}), "n2": frozenset({B})}


def test_dht_peers_and_lookup_knobs_are_validated_with_clear_errors() -> None:
    assert check_initial_peers([PEER]) == (PEER,)
    with pytest.raises(ValueError, match=r"not a DHT multiaddr.*/p2p/<peer id>"):
        AgentConfig(initial_peers=("127.0.0.1:4001",))
    with pytest.raises(ValueError, match="not one string"):
        AgentConfig(initial_peers=PEER)  # type: ignore[arg-type]
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="owner_cache_s"):
            AgentConfig(owner_cache_s=bad)
        with pytest.raises(ValueError, match="owner_lookup_timeout_s"):
            AgentConfig(owner_lookup_timeout_s=bad)
    with pytest.raises(ValueError, match="timeout_s must be > 0"):
        OwnerDirectory(FakeOwners({}).fetch, timeout_s=0)


def test_a_malformed_multiaddr_is_refused_before_any_dht_starts() -> None:
    with pytest.raises(ValueError, match=r"not a valid multiaddr.*Not a base 10 integer"):
        DhtOwnerSource(["/ip4/127.0.0.1/tcp/port/p2p/12D3KooWRe5bkLFqU2Jt5ZEyVoTL7xFyBRGFHjnrSkUotK3ozu7W"])


async def test_an_agent_whose_dht_peers_are_unreachable_fails_to_connect_with_a_clear_error() -> None:
    agent = Agent(config=AgentConfig(initial_peers=("/ip4/127.0.0.1/tcp/9/p2p/" + PEER.rsplit("/", 1)[1],)))
    with pytest.raises(DhtJoinError, match=r"could not join the DHT through /ip4/127\.0\.0\.1/tcp/9/.*bootstrap"):
        await agent.connect()
    assert agent.owners is None and agent.replies.owners is None  # nothing half-started is left behind


async def test_lookups_share_one_cached_view_until_it_is_older_than_the_ttl() -> None:
    source, clock = FakeOwners({"n1": frozenset({A})}), Clock()
    owners = OwnerDirectory(source.fetch, ttl_s=10.0, clock=clock)
    results = await asyncio.gather(*(owners.confirm("n1", A) for _ in range(5)))
    assert results == [True] * 5 and source.fetches == 1  # concurrent lookups joined one fetch
    clock.now += 9.0
    assert await owners.confirm("n1", A) is True and source.fetches == 1
    clock.now += 2.0
    assert await owners.confirm("n1", A) is True and source.fetches == 2


async def test_a_mismatch_is_rechecked_on_a_fresh_view_before_it_counts() -> None:
    source, clock = FakeOwners({"n1": frozenset({A})}), Clock()
    owners = OwnerDirectory(source.fetch, ttl_s=10.0, min_refresh_s=1.0, clock=clock)
    assert await owners.confirm("n1", A) is True
    source.owners = {"n1": frozenset({B})}  # n1 restarted with a new key
    clock.now += 5.0
    assert await owners.confirm("n1", B) is True and source.fetches == 2  # the cached view said A; fresh says B
    assert await owners.confirm("n1", A) is False and source.fetches == 2  # view 0 s old: no second query
    assert await owners.confirm("unknown", A) is None


async def test_a_failing_or_slow_dht_leaves_results_unconfirmed_and_is_not_hammered() -> None:
    source, clock = FakeOwners({}, fail=True), Clock()
    owners = OwnerDirectory(source.fetch, ttl_s=10.0, min_refresh_s=1.0, clock=clock)
    assert await owners.confirm("n1", A) is None and owners.failures == 1
    assert await owners.confirm("n1", A) is None and source.fetches == 1  # no retry within min_refresh_s
    clock.now += 1.5
    source.fail = False
    source.owners = {"n1": frozenset({A})}
    assert await owners.confirm("n1", A) is True and source.fetches == 2

    slow = OwnerDirectory(FakeOwners({"n1": frozenset({A})}, delay_s=30.0).fetch, timeout_s=0.2)
    started = time.monotonic()
    assert await slow.confirm("n1", A) is None
    assert time.monotonic() - started < 1.0  # bounded by timeout_s, not by the DHT
    await slow.close()


class Owners:
    """An :class:`agent.replies.OwnerCheck` over a fixed owner map."""

    def __init__(self, owners: OwnerMap) -> None:
        self.owners = owners
        self.asked: list[str] = []

    async def confirm(self, node_id: str, signer_key: bytes) -> bool | None:
        self.asked.append(node_id)
        await asyncio.sleep(0.01)  # a lookup takes time: other deliveries run meanwhile
        return signer_confirmation(signer_key, self.owners.get(node_id), node_id=node_id)


@pytest.fixture(scope="module")
def keys() -> tuple[ResultSigner, ResultSigner]:
    return ResultSigner(RSAPrivateKey()), ResultSigner(RSAPrivateKey())


async def receive(router: ReplyRouter, request_id: str, *deliveries: Delivered) -> Any:
    pending = router.register(request_id)
    await asyncio.gather(*(router.receive(d) for d in deliveries))  # type: ignore[arg-type]
    items = [pending.items.get_nowait() for _ in range(pending.items.qsize())]
    return items[-1]


def make_router(owners: Owners | None) -> tuple[ReplyRouter, list[Verdict]]:
    reported: list[Verdict] = []
    router = ReplyRouter(AgentConfig(report_outcomes=False),
                         lambda pending, message, **kw: reported.append(kw.get("verdict", Verdict.UNSIGNED)))
    router.owners = owners
    return router, reported


async def test_the_owners_answer_is_confirmed_and_says_so(keys: tuple[ResultSigner, ResultSigner]) -> None:
    owner, _ = keys
    router, _ = make_router(Owners({"node-a": frozenset({owner.public_key})}))
    result = await receive(router, "r1", result_delivery(signed_result(owner, "r1", [5, 6])))
    assert isinstance(result, GenerationResult) and result.signer_confirmed is True
    assert result.to_dict()["signer_confirmed"] is True and "node node-a (signer confirmed)" in result.summary()


async def test_an_impostors_valid_signature_is_refused_and_still_reported_as_evidence(
    keys: tuple[ResultSigner, ResultSigner], caplog: pytest.LogCaptureFixture
) -> None:
    owner, impostor = keys
    router, reported = make_router(Owners({"node-a": frozenset({owner.public_key})}))
    error = await receive(router, "r2", result_delivery(signed_result(impostor, "r2", [5, 6])))
    assert isinstance(error, SignerNotOwnerError) and isinstance(error, ResultSignatureError)
    assert error.recoverable and error.code_name == "NODE_FAILURE"  # the request can be sent again
    assert "names node 'node-a'" in str(error) and "send the request again" in str(error)
    assert reported == [Verdict.VALID]  # the broker gets the signed outcome and judges the signer itself
    assert "refusing the result of request r2" in caplog.text


async def test_what_cannot_be_checked_is_accepted_unconfirmed(keys: tuple[ResultSigner, ResultSigner]) -> None:
    owner, _ = keys
    for owners in (None, Owners({})):  # no DHT configured; a DHT without a record of node-a
        router, _ = make_router(owners)
        result = await receive(router, "r3", result_delivery(signed_result(owner, "r3", [5])))
        assert result.signed and result.signer_confirmed is None and "(signer unconfirmed)" in result.summary()
    checked = Owners({"node-a": frozenset({owner.public_key})})
    router, _ = make_router(checked)
    unsigned = signed_result(owner, "r4", [5])
    unsigned.ClearField("signature")
    unsigned.ClearField("signer_key")
    result = await receive(router, "r4", result_delivery(unsigned))
    assert result.signer_confirmed is None and result.signer_status == "unsigned" and checked.asked == []


async def test_a_forged_signature_is_refused_as_before_without_asking_the_dht(
    keys: tuple[ResultSigner, ResultSigner]
) -> None:
    owner, _ = keys
    checked = Owners({"node-a": frozenset({owner.public_key})})
    router, reported = make_router(checked)
    forged = signed_result(owner, "r5", [5, 6])
    forged.text = "something else"
    error = await receive(router, "r5", result_delivery(forged))
    assert type(error) is ResultSignatureError and checked.asked == [] and reported == [Verdict.INVALID]


async def test_a_copy_of_the_result_arriving_during_the_lookup_is_dropped(
    keys: tuple[ResultSigner, ResultSigner]
) -> None:
    owner, _ = keys
    router, reported = make_router(Owners({"node-a": frozenset({owner.public_key})}))
    delivery = result_delivery(signed_result(owner, "r6", [5, 6]))
    pending = router.register("r6")
    await asyncio.gather(router.receive(delivery), router.receive(delivery))  # type: ignore[arg-type]
    items = [pending.items.get_nowait() for _ in range(pending.items.qsize())]
    assert [type(i).__name__ for i in items] == ["Chunk", "GenerationResult"]  # the tokens, then one result
    assert router.duplicates_dropped == 1 and reported == [Verdict.VALID]
