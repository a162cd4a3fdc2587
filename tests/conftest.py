"""Shared fixtures: a real RabbitMQ (started if needed), an isolated topology namespace, the tiny model."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aio_pika
import pytest

from proto.settings import amqp_url_from_env
from proto.topology import Topology

ROOT = Path(__file__).resolve().parent.parent


def _rabbitmq_reachable(url: str) -> bool:
    async def probe() -> bool:
        try:
            connection = await aio_pika.connect(url, timeout=3)
        except Exception:
            return False
        await connection.close()
        return True

    return asyncio.run(probe())


@pytest.fixture(scope="session")
def amqp_url() -> str:
    """URL of a running RabbitMQ; starts the local server when it is not up."""
    url = amqp_url_from_env()
    if not _rabbitmq_reachable(url):
        subprocess.run(["rabbitmq-server", "-detached"], check=False, capture_output=True)
        subprocess.run(["rabbitmqctl", "await_startup", "--timeout", "120"], check=False, capture_output=True)
        if not _rabbitmq_reachable(url):
            pytest.fail(f"RabbitMQ is not reachable at {url} and could not be started")
    return url


@pytest.fixture
async def topology(amqp_url: str) -> AsyncIterator[Topology]:
    """A fresh namespace per test; its queues are deleted afterwards (only those this test created)."""
    topo = Topology(namespace=f"dinettest-{uuid.uuid4().hex[:10]}")
    yield topo
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        await delete_namespace_queues(channel, topo)
    finally:
        await connection.close()


async def delete_namespace_queues(channel: aio_pika.abc.AbstractChannel, topo: Topology) -> None:
    """Delete every queue and exchange whose name starts with the test namespace."""
    listing = subprocess.run(
        ["rabbitmqctl", "-q", "list_queues", "name", "--no-table-headers"],
        check=False, capture_output=True, text=True,
    )
    prefix = topo.namespace + "."
    for name in listing.stdout.split():
        if name.startswith(prefix):
            try:
                await channel.queue_delete(name)
            except Exception:  # already gone
                continue
    with contextlib.suppress(Exception):
        await channel.exchange_delete(topo.dead_letter_exchange)


@pytest.fixture(scope="session")
def tiny_model_path() -> Path:
    """The tiny Llama test model, built once per machine (scripts/setup.sh builds it too)."""
    models_dir = Path(os.environ.get("DINET_MODELS_DIR", ROOT / ".cache" / "models"))
    path = models_dir / "tiny"
    if not (path / "config.json").exists():
        from node.model_builder import build_model

        build_model(path, "tiny")
    return path


@pytest.fixture
def no_automatic_gc() -> Iterator[None]:
    """Keep garbage uncollected until a fork (this process's collector would otherwise run at some point)."""
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
