"""`dinet-broker` as a user runs it: help, init (idempotent), status (table and JSON), config errors."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

from proto import messages_pb2
from proto.common_pb2 import ErrorCode
from proto.topology import PRIORITIES, Topology
from tests.helpers_broker import ROOT, publish_report
from tests.helpers_reputation import outcome_proto


def broker_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "broker", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_help_explains_every_command() -> None:
    out = broker_cli("--help")
    assert out.returncode == 0 and "routes each one" in out.stdout
    for command in ("init", "run", "status"):
        sub = broker_cli(command, "--help")
        assert sub.returncode == 0 and "--amqp-url" in sub.stdout, sub.stderr
    assert "--static-group" in broker_cli("run", "--help").stdout


def test_bad_configuration_says_what_to_fix(amqp_url: str, topology: Topology) -> None:
    out = broker_cli("run", "--amqp-url", amqp_url, "--namespace", topology.namespace, "--static-group", "tiny")
    assert out.returncode == 2 and "GROUP=MODEL" in out.stderr
    out = broker_cli("run", "--amqp-url", amqp_url, "--namespace", topology.namespace, "--static-group", "g=tiny",
                     "--scheduler", "nonsense")
    assert out.returncode == 2 and "unknown scheduler" in out.stderr
    out = broker_cli("run", "--amqp-url", amqp_url, "--namespace", topology.namespace, "--static-group", "g=tiny",
                     "--reputation-threshold", "5")
    assert out.returncode == 2 and "reputation threshold must be in [0, 1]" in out.stderr


async def test_init_is_idempotent_and_status_shows_the_deployment(amqp_url: str, topology: Topology) -> None:
    for _ in range(2):
        out = await asyncio.to_thread(broker_cli, "init", "--amqp-url", amqp_url, "--namespace", topology.namespace,
                                      "--group", "g1")
        assert out.returncode == 0, out.stderr
    assert topology.group_queue("g1") in out.stdout
    now = time.time()
    for i in range(6):
        ok = i % 3 != 0  # as the agents saw it; every node claims success for itself
        node = "node-a" if ok else "node-b"
        decision = messages_pb2.RoutingDecision(scheduler="fixed-rule", group="g1", routed_at=now)
        await publish_report(
            amqp_url, topology,
            messages_pb2.RoutingRecord(request_id=f"r{i}", agent_id="a1", model="tiny", decision=decision),
            messages_pb2.TimingReport(request_id=f"r{i}", node_id=node, group="g1", model="tiny", ok=True,
                                      finished_at=now, decision=decision),
            outcome_proto(f"r{i}", node, group="g1", ok=ok,
                          code=ErrorCode.ERROR_CODE_UNSPECIFIED if ok else ErrorCode.NODE_FAILURE),
        )
    args = ("status", "--amqp-url", amqp_url, "--namespace", topology.namespace, "--static-group", "g1=tiny")
    out = await asyncio.to_thread(broker_cli, *args, "--json")
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    assert [q["queue"] for q in status["request_queues"]] == [topology.request_queue(p) for p in PRIORITIES]
    (group,) = status["groups"]
    assert group["group"] == "g1" and group["models"] == ["tiny"] and group["queue"]["exists"]
    nodes = {n["node_id"]: n for n in group["nodes"]}
    assert nodes["node-a"]["eligible"] and nodes["node-a"]["reports"] == 4
    assert nodes["node-b"]["score"] < nodes["node-a"]["score"]
    assert status["telemetry_reports"] == 6 and status["rates"]["completed_per_s"] > 0
    assert status["outcomes"] == {"judged": 6, "unattributed": 0, "ignored": {}}
    assert status["schedulers"][0]["scheduler"] == "fixed-rule"
    table = await asyncio.to_thread(broker_cli, *args)
    assert table.returncode == 0
    for needle in ("Queues", "Consumer groups", "node-a", "node-b", topology.dead_letter_queue, "fixed-rule"):
        assert needle in table.stdout, (needle, table.stdout)
