"""`dinet-node run` as a real process: SIGTERM mid-task loses nothing; dedup survives a restart."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aio_pika
import pytest

from agent import Agent
from proto.topology import Topology
from tests.helpers_worker import GROUP, Forwarder, make_request, publish_task, reference_greedy, reply_queue, routed

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "import os\nimport sys\n"


class NodeProcess:
    """``python -m node run`` in the background, its log kept for assertions."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        async for raw in self.proc.stderr:
            self.lines.append(raw.decode(errors="replace").rstrip())

    async def wait_log(self, needle: str, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while not any(needle in line for line in self.lines):
            if self.proc.returncode is not None or time.monotonic() > deadline:
                raise AssertionError(f"{needle!r} not in the node's log:\n" + "\n".join(self.lines[-40:]))
            await asyncio.sleep(0.05)

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        await self._reader
        return code


@contextlib.asynccontextmanager
async def node_process(amqp_url: str, topology: Topology, model: Path, state_dir: Path, *,
                       grace_s: float, extra: tuple[str, ...] = ()) -> AsyncIterator[NodeProcess]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "node", "run", "--model", str(model), "--model-name", "tiny", "--group", GROUP,
        "--namespace", topology.namespace, "--state-dir", str(state_dir), "--drain-grace-s", str(grace_s),
        "--threads", "1", "--telemetry-lookback-s", "600", *extra,
        cwd=ROOT, env={**os.environ, "DINET_AMQP_URL": amqp_url},
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    node = NodeProcess(proc)
    try:
        await node.wait_log("ready: model")
        yield node
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@pytest.fixture
async def forwarder(amqp_url: str, topology: Topology) -> AsyncIterator[Forwarder]:
    connection = await aio_pika.connect_robust(amqp_url)
    fwd = Forwarder(topology)
    await fwd.start(connection)
    yield fwd
    await fwd.close()
    await connection.close()


async def test_sigterm_mid_task_finishes_it_within_the_grace_period(
    forwarder, amqp_url: str, topology: Topology, tiny_model_path: Path, tmp_path: Path
) -> None:
    async with Agent(amqp_url, namespace=topology.namespace) as agent, \
            node_process(amqp_url, topology, tiny_model_path, tmp_path, grace_s=60) as node:
        generation = agent.generate(model="tiny", prompt=PROMPT, max_new_tokens=60)
        iterator = generation.__aiter__()
        tokens = list((await iterator.__anext__()).token_ids)
        node.proc.send_signal(signal.SIGTERM)
        async for chunk in iterator:
            tokens.extend(chunk.token_ids)
        result = await generation.result()
        assert await node.stop() == 0
    expected = reference_greedy(tiny_model_path, PROMPT, 60)
    assert tokens == expected and list(result.token_ids) == expected
    assert any("draining: waiting up to 60.0 s for 1 task(s)" in line for line in node.lines)  # it was mid-task
    assert any("node stopped" in line for line in node.lines)


async def test_sigterm_past_the_grace_period_requeues_and_the_next_node_answers(
    forwarder, amqp_url: str, topology: Topology, tiny_model_path: Path, tmp_path: Path
) -> None:
    async with Agent(amqp_url, namespace=topology.namespace) as agent:
        generation = agent.generate(model="tiny", prompt=PROMPT, max_new_tokens=150)
        iterator = generation.__aiter__()
        async with node_process(amqp_url, topology, tiny_model_path, tmp_path / "a", grace_s=0) as first:
            tokens = list((await iterator.__anext__()).token_ids)
            assert await first.stop() == 0
        assert any("requeued" in line for line in first.lines)
        async with node_process(amqp_url, topology, tiny_model_path, tmp_path / "b", grace_s=30) as second:
            async for chunk in iterator:
                tokens.extend(chunk.token_ids)
            result = await generation.result()
            assert await second.stop() == 0
    expected = reference_greedy(tiny_model_path, PROMPT, 150)
    assert tokens == expected and list(result.token_ids) == expected


async def test_a_restarted_node_does_not_recompute_what_it_answered(
    amqp_url: str, topology: Topology, tiny_model_path: Path, tmp_path: Path
) -> None:
    connection = await aio_pika.connect_robust(amqp_url)
    try:
        async with reply_queue(connection, topology) as (reply_to, replies):
            task = routed(make_request(topology, reply_to, request_id="answered-once")).SerializeToString()
            async with node_process(amqp_url, topology, tiny_model_path, tmp_path, grace_s=5) as node:
                await publish_task(connection, topology, task)
                await replies.wait_results(1)
                assert await node.stop() == 0
            chunks = len(replies.chunks)
            # the ack was "lost": the same task is in the queue again when the node comes back
            await publish_task(connection, topology, task)
            async with node_process(amqp_url, topology, tiny_model_path, tmp_path, grace_s=5) as node:
                await node.wait_log("already answered")
                assert await node.stop() == 0
            assert len(replies.results) == 1 and len(replies.chunks) == chunks
            channel = await connection.channel()
            queue = await topology.group_queue_spec(GROUP).declare(channel)
            assert queue.declaration_result.message_count == 0  # acked, not left behind
            await channel.close()
    finally:
        await connection.close()


async def test_a_node_serving_blocks_answers_through_the_chain_engine(
    forwarder, amqp_url: str, topology: Topology, tiny_model_path: Path, tmp_path: Path
) -> None:
    """`--blocks` switches the node to sharded serving (node.blocks): gRPC + DHT + chain driver."""
    async with Agent(amqp_url, namespace=topology.namespace) as agent, \
            node_process(amqp_url, topology, tiny_model_path, tmp_path, grace_s=5, extra=("--blocks", "0:4")) as node:
        result = await agent.complete(model="tiny", prompt=PROMPT, max_new_tokens=16, timeout=60)
        assert await node.stop() == 0
    assert list(result.token_ids) == reference_greedy(tiny_model_path, PROMPT, 16)
    assert any("serving blocks (0, 4)" in line for line in node.lines)
