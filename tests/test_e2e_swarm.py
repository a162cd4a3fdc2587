"""The whole system as users run it, every role its own process:

bootstrap DHT peer + broker reading live groups from the DHT + two nodes that each hold half of the
model's blocks + the agent. The answer must be exactly what ``transformers`` produces for the whole
model, and each method the scheduler can route must keep greedy output identical.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import Agent
from proto import errors
from proto.node_identity import self_certifies
from proto.topology import Topology
from tests.helpers_worker import reference_greedy

ROOT = Path(__file__).resolve().parent.parent
GROUP = "swarm-cpu"


class Role:
    """One role process in its own process group, with its log in a file."""

    def __init__(self, name: str, args: list[str], log_dir: Path, env: dict[str, str]) -> None:
        self.name = name
        self.log = log_dir / f"{name}.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", *args], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while pattern not in self.text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{self.name} not ready ({pattern!r}):\n{self.text()[-3000:]}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # the main process only: it shuts its DHT child down itself
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(30)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # what is left of the group (hung DHT child, p2pd): ours
        self.proc.wait()


def start_bootstrap_dht(log_dir: Path, env: dict[str, str], roles: list[Role], *, timeout: float) -> list[str]:
    """Start a ``dinet-node dht`` peer (appended to ``roles``, so the caller stops it) and return its multiaddrs."""
    peers_file = log_dir / "peers"
    dht = Role("dht", ["node", "dht", "--maddrs-file", str(peers_file)], log_dir, env)
    roles.append(dht)
    deadline = time.monotonic() + timeout
    while not (peers_file.exists() and peers_file.read_text().strip()):
        if dht.proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError("bootstrap DHT peer did not start:\n" + dht.text())
        time.sleep(0.1)
    return peers_file.read_text().split()


@pytest.fixture
def swarm(amqp_url: str, topology: Topology, tiny_model_path: Path, tmp_path: Path) -> Iterator[list[Role]]:
    env = {**os.environ, "DINET_AMQP_URL": amqp_url}
    roles: list[Role] = []
    try:
        peers = start_bootstrap_dht(tmp_path, env, roles, timeout=90)
        broker = Role("broker", ["broker", "run", "--namespace", topology.namespace, "--initial-peers", *peers],
                      tmp_path, env)
        roles.append(broker)
        for span in ("0:2", "2:4"):
            roles.append(Role(
                f"node-{span}",
                ["node", "run", "--model", str(tiny_model_path), "--model-name", "tiny", "--group", GROUP,
                 "--namespace", topology.namespace, "--blocks", span, "--initial-peers", *peers,
                 "--state-dir", str(tmp_path / f"state-{span.replace(':', '-')}"), "--threads", "1",
                 *(["--accelerated"] if span == "2:4" else [])],
                tmp_path, env,
            ))
        for role in roles[1:]:
            role.wait_for("routing with scheduler" if role is broker else "ready: model")
        yield roles
    finally:
        for role in reversed(roles):
            role.stop()


async def test_agent_broker_dht_and_a_two_node_chain_answer_like_transformers(
    swarm: list[Role], amqp_url: str, topology: Topology, tiny_model_path: Path
) -> None:
    prompt = "def parse(text):\n    return text.split()\n\ndef parse(text):"
    expected = reference_greedy(tiny_model_path, prompt, 16)
    node_ids = set()
    async with Agent(amqp_url, namespace=topology.namespace) as agent:
        deadline = time.monotonic() + 60
        while True:  # the broker's DHT view refreshes every few seconds: wait until it sees the group
            try:
                first = await agent.complete(model="tiny", prompt=prompt, max_new_tokens=16, timeout=60)
                break
            except errors.UnknownModelError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(1.0)
        assert list(first.token_ids) == expected
        assert first.group == GROUP
        node_ids.add(first.node_id)
        assert self_certifies(first.node_id, first.signer_key) and first.signer_confirmed is True
        for method in ("spec_ngram", "chunked_prefill", "prefix_caching"):
            result = await agent.complete(model="tiny", prompt=prompt, max_new_tokens=16, timeout=60,
                                          method_hint=method)
            assert list(result.token_ids) == expected, method
            assert result.method == method
            node_ids.add(result.node_id)
            assert self_certifies(result.node_id, result.signer_key)
    # nodes report under their DHT peer ids, derived from the keys they sign with (proto/node_identity.py)
    assert all(n.startswith("Qm") for n in node_ids), node_ids
