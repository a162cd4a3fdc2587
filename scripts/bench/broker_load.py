"""The load generator of the broker benchmark (scripts/bench/broker.py), run in its own process.

It publishes the request stream (confirmed, pipelined, with a bounded backlog) and is the
stub consumer of every group queue. It lives apart from the benchmark's broker side
because it is a separate process with its own event loop: :func:`driver_main` is the
spawned process's entry point, and nothing in it touches the broker under test.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import os
import time

import aio_pika
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic

from proto import messages_pb2
from proto.topology import Topology

MODEL = "bench-model"
OUTPUTS = (16, 32, 64, 128, 256)


def make_prompts(n: int) -> list[str]:
    """``n`` distinct prompts (deterministic): prose, code-like repetitive text and records, 60-2,400 chars.

    Every eighth one starts with a shared system-prompt prefix, as agent traffic does.
    """
    words = ["the", "harbour", "supply", "chain", "essay", "letter", "tax", "forms", "sensor", "readings",
             "inventory", "story", "night", "summary", "report", "table", "customer", "order", "shipment",
             "delay", "weather", "forecast", "budget", "review"]
    system = "You are a careful assistant. Answer briefly and cite the input where you can. " * 2
    out = []
    for i in range(n):
        length = 60 + (i * 7919) % 2340
        kind = i % 3
        if kind == 0:
            body = " ".join(words[(i * 13 + j * 7) % len(words)] for j in range(length // 6))
        elif kind == 1:
            body = "".join(f"def f{j}(x):\n    return x * {j}\n" for j in range(length // 30 + 1))
        else:
            body = "\n".join(f"id={i}-{j}, item={words[j % len(words)]}, qty={j % 9}" for j in range(length // 35 + 1))
        text = f"[{i}] {body}"[:length]
        out.append(system + text if i % 8 == 0 else text)
    return out


async def _drive(
    url: str, namespace: str, n: int, backlog: int, priorities: list[str], preload: bool, out: mp.Queue,
    groups: list[str], n_prompts: int,
) -> None:
    """Publish ``n`` requests (at most ``backlog`` not yet routed) and be the stub group that acks them.

    Reports the mean number of requests published but not yet routed while publishing: near ``backlog``
    the broker is the bottleneck (what the benchmark measures); far below it the driver could not keep up.
    """
    topology = Topology(namespace)
    connection = await aio_pika.connect(url)
    pub = await connection.channel()
    sub = await connection.channel()
    await sub.set_qos(prefetch_count=1000)
    await topology.declare_core(pub, groups=tuple(groups))
    reply = topology.reply_queue_spec("bench-agent")
    await reply.declare(pub)
    pub_raw = await pub.get_underlay_channel()
    sub_raw = await sub.get_underlay_channel()
    seen: set[str] = set()
    duplicates = 0
    unacked = 0
    last_tag = 0
    done = asyncio.Event()

    async def on_task(message: DeliveredMessage) -> None:
        # the stub group acks at once (batched: multiple=True every 64 deliveries, or when idle)
        nonlocal duplicates, unacked, last_tag
        tag = message.delivery_tag
        if tag is None:  # aiormq types it optional, but every basic.deliver carries one
            raise RuntimeError("a delivered task without a delivery tag")
        rid = message.header.properties.message_id or ""
        duplicates += rid in seen
        seen.add(rid)
        unacked += 1
        last_tag = tag
        if unacked >= 64:
            unacked = 0
            await sub_raw.basic_ack(tag, multiple=True)
        if len(seen) >= n:
            done.set()

    async def flush_acks() -> None:
        nonlocal unacked
        while True:
            await asyncio.sleep(0.02)
            if unacked:
                unacked = 0
                await sub_raw.basic_ack(last_tag, multiple=True)

    window = asyncio.Semaphore(512)  # confirms in flight at the driver
    prompts = make_prompts(n_prompts)

    async def publish_one(i: int) -> None:
        request = messages_pb2.InferenceRequest(
            request_id=f"bench-{i}", model=MODEL, prompt=prompts[(i * 7) % len(prompts)],
            max_new_tokens=OUTPUTS[i % len(OUTPUTS)],
            priority=priorities[i % len(priorities)], reply_to=reply.name, submitted_at=time.time(),
        )
        try:
            await pub_raw.basic_publish(
                request.SerializeToString(), routing_key=topology.request_queue(request.priority),
                properties=Basic.Properties(delivery_mode=2, message_id=request.request_id), mandatory=True,
            )
        finally:
            window.release()

    tasks: set[asyncio.Task[None]] = set()

    def spawn(i: int) -> None:
        task = asyncio.create_task(publish_one(i))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    flusher = asyncio.create_task(flush_acks())
    sent = 0
    ahead: list[int] = []  # published but not yet routed, sampled while publishing

    async def sample_backlog() -> None:
        while True:
            await asyncio.sleep(0.01)
            ahead.append(sent - len(seen))

    if preload:
        for sent in range(n):
            await window.acquire()
            spawn(sent)
        sent = n
        while tasks:
            await asyncio.sleep(0.01)
    for group in groups:
        await sub_raw.basic_consume(topology.group_queue(group), on_task)
    out.put(("ready", None))
    started = time.monotonic()
    sampler = asyncio.create_task(sample_backlog())
    while sent < n:
        if sent - len(seen) >= backlog:
            await asyncio.sleep(0.001)
            continue
        await window.acquire()
        spawn(sent)
        sent += 1
    publish_s = time.monotonic() - started
    sampler.cancel()
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(done.wait(), timeout=120)
    await asyncio.sleep(0.5)  # late duplicates
    flusher.cancel()
    out.put(("done", {"published": sent, "distinct_routed": len(seen), "duplicates": duplicates,
                      "publish_s": round(publish_s, 3),
                      "backlog_mean": round(sum(ahead) / len(ahead)) if ahead else None}))
    await connection.close()


def driver_main(
    url: str, namespace: str, n: int, backlog: int, priorities: list[str], preload: bool, out: mp.Queue,
    groups: list[str], n_prompts: int, nice: int,
) -> None:
    if nice:  # see --driver-nice: agents and nodes do not run on the broker's machine in production
        os.nice(nice)
    asyncio.run(_drive(url, namespace, n, backlog, priorities, preload, out, groups, n_prompts))
