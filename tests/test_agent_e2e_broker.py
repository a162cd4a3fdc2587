"""The walking skeleton end to end with the real broker process: agent -> RabbitMQ -> broker -> node -> agent."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aio_pika
import pytest

from agent import Agent
from proto import errors
from proto.topology import Topology
from tests.helpers_worker import (  # noqa: F401 (fixtures)
    GROUP,
    reference_greedy,
    running_worker,
    tiny_engine,
    tiny_tokenizer,
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
async def broker_and_node(
    amqp_url: str, topology: Topology, tiny_engine, tiny_tokenizer  # noqa: F811
) -> AsyncIterator[None]:
    """`python -m broker run` (fixed-rule scheduler, static group) and a node worker on the tiny model."""
    log: list[str] = []
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "broker", "run", "--namespace", topology.namespace, "--static-group", f"{GROUP}=tiny",
        cwd=ROOT, env={**os.environ, "DINET_AMQP_URL": amqp_url},
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )

    async def read() -> None:
        assert proc.stderr is not None
        async for raw in proc.stderr:
            log.append(raw.decode(errors="replace"))

    reader = asyncio.create_task(read())
    connection = await aio_pika.connect_robust(amqp_url)
    try:
        deadline = time.monotonic() + 90
        while not any("routing with scheduler" in line for line in log):
            if proc.returncode is not None or time.monotonic() > deadline:
                raise AssertionError("broker did not start:\n" + "".join(log[-30:]))
            await asyncio.sleep(0.05)
        async with running_worker(connection, topology, tiny_engine, tiny_tokenizer):
            yield
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        await reader
        await connection.close()


async def test_greedy_through_the_broker_equals_transformers_and_seeded_sampling_repeats(
    broker_and_node, amqp_url: str, topology: Topology, tiny_model_path: Path
) -> None:
    prompt = "def parse(text):"
    async with Agent(amqp_url, namespace=topology.namespace) as agent:
        generation = agent.generate(model="tiny", prompt=prompt, max_new_tokens=20, timeout=60)
        streamed = [t async for chunk in generation for t in chunk.token_ids]
        result = await generation.result()
        sampled = {"model": "tiny", "prompt": prompt, "max_new_tokens": 20, "temperature": 0.9, "top_p": 0.9,
                   "seed": 5, "timeout": 60}
        first, again = await asyncio.gather(agent.complete(**sampled), agent.complete(**sampled))
        # a bad request gets the broker's typed error; the one right after it is served
        with pytest.raises(errors.MaxNewTokensError):
            await agent.complete(model="tiny", prompt=prompt, max_new_tokens=0, timeout=60)
        after = await agent.complete(model="tiny", prompt=prompt, max_new_tokens=4, timeout=60)
    expected = reference_greedy(tiny_model_path, prompt, 20)
    assert streamed == expected and list(result.token_ids) == expected
    assert result.group == GROUP and result.method == "baseline"
    assert first.token_ids == again.token_ids
    assert list(after.token_ids) == expected[:4]
