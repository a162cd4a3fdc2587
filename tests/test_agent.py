"""End to end: agent -> RabbitMQ -> (stand-in broker) -> node worker -> agent, on the tiny model."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aio_pika
import pytest

from agent import Agent, AgentConfig
from proto import errors, messages_pb2
from proto.topology import Topology
from tests.helpers_worker import (  # noqa: F401 (fixtures)
    Forwarder,
    reference_greedy,
    running_worker,
    tiny_engine,
    tiny_tokenizer,
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
async def network(amqp_url: str, topology: Topology, tiny_engine, tiny_tokenizer) -> AsyncIterator[dict]:  # noqa: F811
    """A stand-in broker and one node on the tiny model, in this test's namespace."""
    connection = await aio_pika.connect_robust(amqp_url)
    forwarder = Forwarder(topology)
    await forwarder.start(connection)
    async with running_worker(connection, topology, tiny_engine, tiny_tokenizer) as worker:
        yield {"connection": connection, "worker": worker, "forwarder": forwarder}
    await forwarder.close()
    await connection.close()


async def test_streamed_greedy_tokens_equal_transformers_generate(
    network, amqp_url: str, topology: Topology, tiny_model_path: Path
) -> None:
    prompt = "def parse(text):"
    async with Agent(amqp_url, namespace=topology.namespace) as agent:
        generation = agent.generate(model="tiny", prompt=prompt, max_new_tokens=24)
        chunks = [chunk async for chunk in generation]
        result = await generation.result()
    expected = reference_greedy(tiny_model_path, prompt, 24)
    assert [t for c in chunks for t in c.token_ids] == expected
    assert list(result.token_ids) == expected
    assert "".join(c.text for c in chunks) == result.text
    assert [c.index for c in chunks] == sorted({c.index for c in chunks})
    assert result.node_id == "node-a" and result.method == "baseline" and result.finish_reason == "length"
    assert 0 < result.ttft_s <= result.total_s and result.node_timing.new_tokens == 24
    summary = result.summary()
    assert "24 tokens" in summary and "TTFT" in summary and "node-a" in summary and "baseline" in summary


async def test_seeded_sampling_is_reproducible(network, amqp_url: str, topology: Topology) -> None:
    async with Agent(amqp_url, namespace=topology.namespace) as agent:
        kwargs = {"model": "tiny", "prompt": "The quick brown fox", "max_new_tokens": 24, "temperature": 1.0,
                  "top_p": 0.9}
        first, again, other = await asyncio.gather(
            agent.complete(**kwargs, seed=11), agent.complete(**kwargs, seed=11), agent.complete(**kwargs, seed=12)
        )
    assert first.token_ids == again.token_ids
    assert first.token_ids != other.token_ids


async def test_typed_errors_are_raised(network, amqp_url: str, topology: Topology) -> None:
    async with Agent(amqp_url, namespace=topology.namespace) as agent:
        with pytest.raises(errors.UnknownModelError, match="not 'nope'"):
            await agent.complete(model="nope", prompt="hi", max_new_tokens=4)
        with pytest.raises(errors.DeadlineExceededError) as info:
            await agent.complete(model="tiny", prompt="hi", max_new_tokens=4, deadline_s=0.0)
        assert not info.value.recoverable
        with pytest.raises(errors.PromptEmptyError):
            await agent.complete(model="tiny", prompt="", max_new_tokens=4)
        with pytest.raises(ValueError, match="priority"):
            agent.generate(model="tiny", prompt="hi", priority="urgent")
        # a valid request right after the bad ones is served normally
        assert len((await agent.complete(model="tiny", prompt="hi", max_new_tokens=4)).token_ids) == 4


async def test_duplicate_replies_are_dropped(network, amqp_url: str, topology: Topology) -> None:
    async with Agent(amqp_url, namespace=topology.namespace) as agent:
        result = await agent.complete(model="tiny", prompt="hello", max_new_tokens=6)
        # the same result and a stale chunk arrive again (as after a redelivered task)
        channel = await network["connection"].channel()
        rid = result.request_id
        for kind, body in (
            ("InferenceResult", messages_pb2.InferenceResult(request_id=rid, ok=True).SerializeToString()),
            ("TokenChunk", messages_pb2.TokenChunk(request_id=rid, index=0, token_ids=[1]).SerializeToString()),
        ):
            message = aio_pika.Message(body, type=kind)
            await channel.default_exchange.publish(message, routing_key=agent.reply_queue_name)
        for _ in range(100):
            if agent.duplicates_dropped >= 2:
                break
            await asyncio.sleep(0.02)
        await channel.close()
        assert agent.duplicates_dropped == 2
        # the agent keeps working
        assert (await agent.complete(model="tiny", prompt="hello", max_new_tokens=6)).token_ids == result.token_ids


async def test_a_task_requeued_mid_stream_is_streamed_once(
    amqp_url: str, topology: Topology, tiny_engine, tiny_tokenizer, tiny_model_path: Path  # noqa: F811
) -> None:
    """Node A stops mid-generation and requeues; node B recomputes; the agent sees each token once."""
    connection = await aio_pika.connect_robust(amqp_url)
    forwarder = Forwarder(topology)
    await forwarder.start(connection)
    prompt = "import os\nimport sys\n"
    try:
        async with Agent(amqp_url, namespace=topology.namespace) as agent:
            generation = agent.generate(model="tiny", prompt=prompt, max_new_tokens=200)
            tokens: list[int] = []
            async with running_worker(connection, topology, tiny_engine, tiny_tokenizer) as worker_a:
                iterator = generation.__aiter__()
                first = await iterator.__anext__()
                tokens.extend(first.token_ids)
                await worker_a.drain(0.0)
                assert worker_a.stats.requeued == 1
            async with running_worker(connection, topology, tiny_engine, tiny_tokenizer, node_id="node-b"):
                async for chunk in iterator:
                    tokens.extend(chunk.token_ids)
                result = await generation.result()
        expected = reference_greedy(tiny_model_path, prompt, 200)
        assert tokens == expected and list(result.token_ids) == expected
        assert result.node_id == "node-b"
    finally:
        await forwarder.close()
        await connection.close()


async def test_close_cancels_pending_and_timeout_explains(amqp_url: str, topology: Topology) -> None:
    agent = Agent(amqp_url, namespace=topology.namespace)
    await agent.connect()
    with pytest.raises(TimeoutError, match="dinet-broker run"):
        await agent.complete(model="tiny", prompt="hi", timeout=0.3)
    generation = agent.generate(model="tiny", prompt="nobody answers")
    await generation.start()
    waiter = asyncio.create_task(generation.result())
    await asyncio.sleep(0.05)
    await agent.close()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    with pytest.raises(RuntimeError, match="not connected"):
        await agent.complete(model="tiny", prompt="hi")


async def test_reply_queue_is_durable_and_named_by_agent_id(amqp_url: str, topology: Topology) -> None:
    config = AgentConfig(agent_id="agent-fixed", namespace=topology.namespace, amqp_url=amqp_url)
    async with Agent(config=config) as agent:
        assert agent.reply_queue_name == topology.reply_queue("agent-fixed")
    connection = await aio_pika.connect(amqp_url)
    channel = await connection.channel()
    await channel.declare_queue(topology.reply_queue("agent-fixed"), passive=True)  # survives the agent
    await connection.close()


async def run_cli(*args: str, env_extra: dict[str, str] | None = None) -> tuple[int, str, str]:
    env = {**os.environ, **(env_extra or {})}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent", *args, cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_cli_streams_text_and_ends_with_a_summary(
    network, amqp_url: str, topology: Topology, tiny_model_path: Path
) -> None:
    common = ("--amqp-url", amqp_url, "--namespace", topology.namespace)
    code, out, err = await run_cli("submit", "--model", "tiny", "--max-new-tokens", "12", *common, "def parse(text):")
    assert code == 0, err
    lines = out.rstrip("\n").split("\n")
    assert lines[-1].startswith("-- 12 tokens | TTFT") and "node node-a" in lines[-1] and "method baseline" in lines[-1]
    code, out, err = await run_cli("submit", "--model", "tiny", "--max-new-tokens", "12", "--json", *common,
                                   "def parse(text):")
    assert code == 0, err
    payload = json.loads(out)
    assert payload["ok"] and payload["token_ids"] == reference_greedy(tiny_model_path, "def parse(text):", 12)


async def test_cli_exits_non_zero_with_the_typed_error(network, amqp_url: str, topology: Topology) -> None:
    code, _, err = await run_cli("submit", "--model", "nope", *("--namespace", topology.namespace), "hi",
                                   env_extra={"DINET_AMQP_URL": amqp_url})
    assert code == 1
    assert "unknown_model" in err and "serves model 'tiny'" in err
