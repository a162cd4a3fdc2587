"""Broker cluster robustness with real processes: SIGKILL of a broker, and a RabbitMQ restart mid-burst."""

from __future__ import annotations

import asyncio
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest

from broker.config import BrokerConfig
from broker.service import BrokerService
from proto.topology import Topology
from tests.helpers_broker import AgentEmu, BrokerProcess, StubGroup

pytestmark = pytest.mark.slow


async def _submit_all(agent: AgentEmu, prompts: list[str], *, concurrency: int = 32) -> dict[str, str]:
    """request_id -> prompt, published with confirms, ``concurrency`` at a time."""
    sent: dict[str, str] = {}
    semaphore = asyncio.Semaphore(concurrency)

    async def one(prompt: str) -> None:
        async with semaphore:
            request = agent.request(prompt=prompt)
            await agent.submit(request)
            sent[request.request_id] = prompt

    await asyncio.gather(*(one(p) for p in prompts))
    return sent


async def _wait_until(predicate, timeout: float) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


def _check_exactly_once(agent: AgentEmu, sent: dict[str, str]) -> None:
    assert set(agent.results) == set(sent)
    for rid, prompt in sent.items():
        result = agent.results[rid]
        assert result.ok, result
        assert result.text == "echo:" + prompt  # each result matches its own request


async def test_sigkill_one_of_two_brokers_loses_nothing(amqp_url: str, topology: Topology, tmp_path: Path) -> None:
    n = 500
    brokers = [BrokerProcess(amqp_url, topology, tmp_path / f"broker{i}.log", "--static-group", "g1=tiny",
                             "--broker-id", f"b{i}") for i in range(2)]
    try:
        await asyncio.gather(*(b.ready() for b in brokers))
        async with AgentEmu(amqp_url, topology) as agent, StubGroup(amqp_url, topology, "g1", prefetch=200) as stub:
            prompts = [f"prompt {i}" for i in range(n)]
            submit = asyncio.create_task(_submit_all(agent, prompts))
            await _wait_until(lambda: len(stub.tasks) >= n // 4, timeout=60)
            brokers[0].kill()  # mid-stream: it holds unacked requests and unconfirmed publishes
            sent = await submit
            await agent.wait_for(sent, timeout=120)
            await asyncio.sleep(0.5)  # let late duplicates (if any) arrive before counting
            routed_by = {t.decision.broker_id for t in stub.tasks}
            print(f"tasks={len(stub.tasks)} duplicates_at_agent={agent.duplicates} "
                  f"by_b0={sum(t.decision.broker_id == 'b0' for t in stub.tasks)}")
        _check_exactly_once(agent, sent)
        assert len(agent.results) == n
        assert {t.request.request_id for t in stub.tasks} == set(sent)  # every request reached the group queue
        assert routed_by == {"b0", "b1"}  # both brokers shared the work before the kill
    finally:
        for b in brokers:
            b.stop()


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=False, capture_output=True, timeout=180)


async def test_rabbitmq_restart_mid_burst_answers_every_request_once(
    amqp_url: str, topology: Topology, tmp_path: Path
) -> None:
    n = 300
    broker = BrokerProcess(amqp_url, topology, tmp_path / "broker.log", "--static-group", "g1=tiny")
    config = BrokerConfig(amqp_url=amqp_url, namespace=topology.namespace, static_groups={"g1": ("tiny",)},
                          broker_id="in-process")
    try:
        await broker.ready()
        async with AgentEmu(amqp_url, topology) as agent, BrokerService(config) as inproc, \
                StubGroup(amqp_url, topology, "g1", report=True) as stub:
            prompts = [f"burst {i}" for i in range(n)]
            submit = asyncio.create_task(_submit_all(agent, prompts, concurrency=8))
            await _wait_until(lambda: len(stub.tasks) >= n // 5, timeout=60)
            try:
                await asyncio.to_thread(_rabbitmqctl, "stop_app")
                await asyncio.sleep(2)
            finally:
                await asyncio.to_thread(_rabbitmqctl, "start_app")
                await asyncio.to_thread(_rabbitmqctl, "await_startup", "--timeout", "120")
            sent = await submit
            await agent.wait_for(sent, timeout=180)
            await asyncio.sleep(1.0)
            # the telemetry consumer resumed after the restart without counting any report twice
            async with BrokerService(replace(config, broker_id="late")) as late:
                await _wait_until(lambda: inproc.telemetry.received == late.telemetry.received, timeout=30)
                assert inproc.telemetry.received >= n
                now = time.time()
                assert inproc.ledger.table(now) == late.ledger.table(now)
            assert inproc.stats.reconnects >= 1
        _check_exactly_once(agent, sent)
        assert len(agent.results) == n
        assert broker.proc.poll() is None  # the broker process rode out the restart without operator action
    finally:
        broker.stop()
