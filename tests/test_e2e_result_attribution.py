"""End to end: a broker credits a node only with answers signed by the key that owns its DHT record.

Every part is real: a bootstrap DHT peer and two ``dinet-node run`` processes (the tiny model, blocks
served over gRPC, records announced and signed in the hivemind DHT), RabbitMQ, the agent, and a broker
whose directory reads the live DHT (:class:`broker.service.BrokerService`, run in the test's process
only so its ledger and DHT view can be read directly; it starts its own DHT peer as ``dinet-broker run``
does).

The impostor is what the code lets any operator run: ``dinet-node run --node-id <victim's peer id>``.
It joins the DHT under its own key and announces its own group (``imp``, model ``tiny-imp``), so the
broker routes ``tiny-imp`` requests to it, and it answers every task in the victim's name. Since its
node id is not its DHT peer id, its key (from its state directory, node/daemon.py: the key it signs with
and its DHT identity) owns only its own record, and the victim's id derives from the victim's key alone
(proto/node_identity.py). Its answers are validly signed, but the victim's id names the victim's key, so
brokers credit nothing to it ("the named node's id derives from another key"), though it answers first:
a broker that trusted the first key seen for a node id (the fallback for ids that name no key) would
credit it and then refuse the victim. Only successes are
simulated (the tiny model does not fail on demand); a failure in the victim's name goes through the
same check (tests/test_broker_result_attribution.py).

The agent's own view: every agent confirms the victim's answers (its id is the peer id of the key that signed
them, ``signer_confirmed=True``) and refuses the impostor's with :class:`agent.owners.SignerNotOwnerError`:
one without a DHT because the victim's id, of the key-derived form, derives from another key than the
impostor's; one that joins the DHT (``initial_peers``, or ``dinet-agent submit --initial-peers``) by the
same rule before any lookup. Either way the refused answer's signed outcome still reaches the brokers.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent import Agent, AgentConfig
from agent.owners import SignerNotOwnerError
from agent.results import GenerationResult
from broker.config import BrokerConfig
from broker.service import BrokerService
from broker.status import collect_status
from proto import errors
from proto.topology import Topology
from tests.test_e2e_swarm import Role, start_bootstrap_dht

NOT_OWNER = "the named node's id derives from another key"
READY = re.compile(r"node (\S+) ready: model")


def _node(name: str, peers: list[str], tmp_path: Path, env: dict[str, str], topology: Topology, model: Path,
          *extra: str) -> Role:
    return Role(name, ["node", "run", "--model", str(model), "--group", name, "--namespace", topology.namespace,
                       "--initial-peers", *peers, "--state-dir", str(tmp_path / f"state-{name}"), "--threads", "1",
                       *extra], tmp_path, env)


@pytest.fixture
def dht_nodes(amqp_url: str, topology: Topology, tiny_model_path: Path,
              tmp_path: Path) -> Iterator[tuple[list[str], str]]:
    """Bootstrap DHT peer, the victim node (group ``victim``, model ``tiny``) and an impostor node (group ``imp``,
    model ``tiny-imp``) started with the victim's peer id as its node id; yields (DHT peers, victim's id)."""
    env = {**os.environ, "DINET_AMQP_URL": amqp_url}
    roles: list[Role] = []
    try:
        peers = start_bootstrap_dht(tmp_path, env, roles, timeout=60)
        victim = _node("victim", peers, tmp_path, env, topology, tiny_model_path, "--model-name", "tiny")
        roles.append(victim)
        victim.wait_for("ready: model")
        match = READY.search(victim.text())
        assert match is not None
        victim_id = match.group(1)
        assert victim_id.startswith("Qm"), victim_id  # its DHT peer id: RSA keys give sha2-256 ("Qm") peer ids
        impostor = _node("imp", peers, tmp_path, env, topology, tiny_model_path, "--model-name", "tiny-imp",
                         "--node-id", victim_id)
        roles.append(impostor)
        impostor.wait_for(f"node {victim_id} ready: model")
        yield peers, victim_id
    finally:
        for role in reversed(roles):
            role.stop()


async def _wait(condition: Callable[[], object], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def _complete(agent: Agent, model: str) -> GenerationResult:
    deadline = time.monotonic() + 30
    while True:  # the broker learns the group from its next DHT refresh
        try:
            return await agent.complete(model=model, prompt="who answered?", max_new_tokens=4, timeout=60)
        except errors.UnknownModelError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


async def test_only_the_owner_of_a_nodes_dht_record_moves_its_reputation(
    dht_nodes: tuple[list[str], str], amqp_url: str, topology: Topology
) -> None:
    peers, victim_id = dht_nodes
    config = BrokerConfig(amqp_url=amqp_url, namespace=topology.namespace, initial_peers=tuple(peers),
                          directory_ttl_s=1.0)
    async with BrokerService(config) as service, Agent(amqp_url, namespace=topology.namespace) as agent:
        ledger, directory = service.ledger, service.directory
        await _wait(lambda: directory.owner_key(victim_id) is not None and directory.groups_for("tiny-imp"),
                    "the broker's DHT view of both nodes")
        owner = directory.owner_key(victim_id)
        (imp_group,) = directory.groups_for("tiny-imp")
        assert victim_id not in imp_group.nodes  # in the DHT the impostor is a peer of its own, under its own key

        for _ in range(3):  # the impostor answers in the victim's name, first; even this agent, which reads no
            # DHT, refuses it: the victim's id derives from the victim's key, and the answer is signed by another
            with pytest.raises(SignerNotOwnerError, match=f"names node '{victim_id}'.*does not own"):
                await _complete(agent, "tiny-imp")
        await _wait(lambda: ledger.ignored[NOT_OWNER] == 3, "the impostor's outcomes to be judged")
        assert ledger.table(time.time()) == [] and ledger.observed == 0
        assert ledger.score(victim_id, time.time()) == ledger.config.prior

        for _ in range(2):  # the victim's own answers count, though another key came first under its id
            honest = await _complete(agent, "tiny")
            assert (honest.node_id, honest.group, honest.signer_key) == (victim_id, "victim", owner)
            assert honest.signer_confirmed is True  # no DHT needed: the victim's id derives from its signing key
        await _wait(lambda: ledger.observed == 2, "the victim's outcomes to be credited")
        (row,) = ledger.table(time.time())
        assert (row.node_id, row.group, row.reports, row.failures) == (victim_id, "victim", 2, 0.0)
        assert row.successes > 1.9 and ledger.ignored[NOT_OWNER] == 3

        # `dinet-broker status` replays the same stream with a DHT view and must show the same table
        status = await collect_status(amqp_url, topology, directory=directory)
        assert status["outcomes"]["judged"] == 2 and status["outcomes"]["ignored"].get(NOT_OWNER) == 3
        (group,) = [g for g in status["groups"] if g["group"] == "victim"]
        assert [(n["node_id"], n["reports"], n["live"]) for n in group["nodes"]] == [(victim_id, 2, True)]

        # an agent that reads the DHT tells the two apart as well: the victim's answer is confirmed as the
        # victim's, the impostor's is refused (and still reported: the broker judges the signed evidence)
        reads_dht = AgentConfig(amqp_url=amqp_url, namespace=topology.namespace, initial_peers=tuple(peers))
        async with Agent(config=reads_dht) as witness:
            confirmed = await _complete(witness, "tiny")
            assert (confirmed.node_id, confirmed.signer_key, confirmed.signer_confirmed) == (victim_id, owner, True)
            assert "(signer confirmed)" in confirmed.summary()
            with pytest.raises(SignerNotOwnerError, match=f"names node '{victim_id}'.*does not own"):
                await witness.complete(model="tiny-imp", prompt="who answered?", max_new_tokens=4, timeout=60)
        await _wait(lambda: ledger.observed == 3 and ledger.ignored[NOT_OWNER] == 4, "the witness's outcomes")

        # the same through the CLI: exit 1, a node_failure naming the victim, nothing presented as its answer
        cli = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agent", "submit", "who answered?", "--model", "tiny-imp", "--max-new-tokens",
            "4", "--json", "--timeout", "60", "--namespace", topology.namespace, "--initial-peers", *peers,
            env={**os.environ, "DINET_AMQP_URL": amqp_url}, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(cli.communicate(), timeout=90)
        assert cli.returncode == 1, err.decode()
        reply = json.loads(out.decode().strip().splitlines()[-1])
        assert (reply["ok"], reply["error"]) == (False, "node_failure") and victim_id in reply["message"]
