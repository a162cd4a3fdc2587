"""A node survives losing its RabbitMQ connection mid-task: it reconnects, and the task is answered once.

The connection is closed from the server side (``rabbitmqctl close_connection``), which is
what a RabbitMQ restart looks like to a client, without disturbing anyone else's
connections on a shared RabbitMQ.
"""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from pathlib import Path

import aio_pika

from agent import Agent
from proto.topology import Topology
from tests.helpers_worker import (  # noqa: F401 (fixtures)
    Forwarder,
    reference_greedy,
    running_worker,
    tiny_engine,
    tiny_tokenizer,
)


def close_connection_named(name: str) -> bool:
    listing = subprocess.run(
        ["rabbitmqctl", "-q", "list_connections", "pid", "client_properties", "--no-table-headers"],
        check=False, capture_output=True, text=True,
    )
    for line in listing.stdout.splitlines():
        if name in line:
            pid = line.split("\t", 1)[0]
            subprocess.run(["rabbitmqctl", "-q", "close_connection", pid, "test: simulated broker restart"],
                           check=False, capture_output=True)
            return True
    return False


async def test_worker_reconnects_and_the_interrupted_task_is_answered_once(
    amqp_url: str, topology: Topology, tiny_engine, tiny_tokenizer, tiny_model_path: Path  # noqa: F811
) -> None:
    name = f"dinet-test-node-{uuid.uuid4().hex[:8]}"
    node_connection = await aio_pika.connect_robust(amqp_url, client_properties={"connection_name": name},
                                                    reconnect_interval=0.5)
    helper_connection = await aio_pika.connect_robust(amqp_url)
    forwarder = Forwarder(topology)
    await forwarder.start(helper_connection)
    prompt = "The quick brown fox"
    try:
        async with Agent(amqp_url, namespace=topology.namespace) as agent, \
                running_worker(node_connection, topology, tiny_engine, tiny_tokenizer) as worker:
            generation = agent.generate(model="tiny", prompt=prompt, max_new_tokens=200, timeout=120)
            iterator = generation.__aiter__()
            tokens = list((await iterator.__anext__()).token_ids)
            assert await asyncio.to_thread(close_connection_named, name)
            async for chunk in iterator:
                tokens.extend(chunk.token_ids)
            result = await generation.result()
            # and the node keeps serving new requests on the restored connection
            after = await agent.complete(model="tiny", prompt="hello", max_new_tokens=5, timeout=60)
            assert len(after.token_ids) == 5
            assert worker.stats.completed >= 2
        expected = reference_greedy(tiny_model_path, prompt, 200)
        assert tokens == expected and list(result.token_ids) == expected
    finally:
        await forwarder.close()
        await helper_connection.close()
        await node_connection.close()
