#!/usr/bin/env python
"""Broker routing throughput and scheduling latency against the real RabbitMQ.

One broker runs in this process (publisher confirms on, the fixed-rule scheduler or
--scheduler NAME in the loop) and sees ``--groups`` consumer groups (default 4, the
synthetic data's four hardware profiles, two nodes each, as DHT records would give
them), so a learned scheduler scores 8 methods x 4 groups per request. A second
process drives it: it publishes a steady stream of requests (confirmed, pipelined,
with a bounded backlog) drawn from ``--prompts`` distinct prompts of varied length and
kind, with varied ``max_new_tokens``, and is the stub consumer of every group queue: it
acks every routed task at once and counts distinct request ids (scripts/bench/broker_load.py).

Prints as its last line a JSON object with routed_per_s (per broker process),
sched_p50_ms, sched_p99_ms (parse + validate + schedule + serialise, per request),
select_p50_ms, select_p99_ms (the selection alone: ``Router.route``, i.e. candidates, request
features, the policy's choice over every (method, group) pair and the decision) and lost
(requests published but never routed; must be 0), the driver's nice value and mean backlog,
the 1-minute load average at the end, and while measuring the broker's garbage collections
(count, longest and total pause per generation) and involuntary context switches per 1,000 routed.

    .venv/bin/python scripts/bench/broker.py --quick
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import multiprocessing as mp
import os
import platform
import sys
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import aio_pika  # noqa: E402

from broker.directory import GroupDirectory  # noqa: E402
from proto.records import NodeRecord  # noqa: E402
from proto.settings import amqp_url_from_env  # noqa: E402
from proto.topology import Topology  # noqa: E402
from scripts.bench.broker_load import MODEL, driver_main, make_prompts  # noqa: E402


def bench_directory(n_groups: int) -> tuple[GroupDirectory, list[str]]:
    """``n_groups`` groups of two nodes each, with the synthetic data's hardware (as DHT records give them)."""
    from scheduler.synthetic import make_hardware

    records = [
        NodeRecord(peer_id=f"{name}-node{k}", address=f"127.0.0.1:{40000 + 10 * g + k}", group=name,
                   models=(MODEL,), start_block=0, end_block=1, hardware=hw)
        for g, (name, hw) in enumerate(make_hardware(n_groups)) for k in range(2)
    ]
    directory = GroupDirectory()
    directory.set_dht_records(records)
    return directory, sorted({r.group for r in records})


async def _cleanup(url: str, topology: Topology, groups: list[str]) -> None:
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        names = [topology.request_queue(p) for p in ("high", "normal", "batch")]
        names += [topology.group_queue(g) for g in groups]
        names += [topology.reply_queue("bench-agent"), topology.dead_letter_queue,
                  topology.dead_letter_queue + ".watch", topology.telemetry_stream]
        for name in names:
            with contextlib.suppress(Exception):
                await channel.queue_delete(name)
        with contextlib.suppress(Exception):
            await channel.exchange_delete(topology.dead_letter_exchange)
    finally:
        await connection.close()


async def _warm_texts(service: Any, args: argparse.Namespace) -> float:
    """Embed the prompt pool before measuring, as a broker that has run a while has (steady state).

    Prompts never seen before still take the documented fallback (text dims missing) while the
    background encoder works; ``--no-warm-texts`` measures that cold state instead.
    """
    from broker.features import TASK_TEXT_CHARS

    policy = getattr(service.policy, "policy", service.policy)
    cache = getattr(policy, "text_cache", None)
    if cache is None:
        return 0.0
    started = time.monotonic()
    await asyncio.to_thread(cache.warm, [p[:TASK_TEXT_CHARS] for p in make_prompts(args.prompts)])
    return round(time.monotonic() - started, 2)


class _Interference:
    """What can stretch a synchronous scheduling step's wall time besides its own CPU: garbage collections
    (their count and pauses, per generation) and the broker being descheduled (involuntary context switches).

    Why: sched_p99_ms is wall time; these say whether a p99 above the in-process cost came from the
    collector or from the other processes on the machine.
    """

    def __init__(self) -> None:
        self.pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
        self._started = 0.0
        self._csw = 0

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.pauses[info["generation"]].append((time.perf_counter() - self._started) * 1000.0)

    def start(self) -> None:
        import resource

        self._csw = resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw
        gc.callbacks.append(self._on_gc)

    def stop(self, routed: int) -> dict[str, Any]:
        import resource

        gc.callbacks.remove(self._on_gc)
        preempted = resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw - self._csw
        out: dict[str, Any] = {"broker_preempted_per_1k": round(preempted * 1000 / max(1, routed), 1)}
        for gen, pauses in self.pauses.items():
            out[f"gc{gen}"] = {"n": len(pauses), "max_ms": round(max(pauses, default=0.0), 2),
                               "total_ms": round(sum(pauses), 1)}
        return out


async def bench(args: argparse.Namespace) -> dict:
    from broker.config import BrokerConfig
    from broker.service import BrokerService

    url = amqp_url_from_env(args.amqp_url)
    topology = Topology(f"bench-{uuid.uuid4().hex[:8]}")
    directory, groups = bench_directory(args.groups)
    config = BrokerConfig(amqp_url=url, namespace=topology.namespace,
                          scheduler=args.scheduler, scheduler_model=args.scheduler_model, broker_id="bench",
                          max_in_flight=args.max_in_flight, batch_routing=args.batch_routing,
                          watch_dead_letters=False, realtime_priority=args.broker_realtime,
                          record_routes=args.route_records)
    service = BrokerService(config, directory=directory)
    warm_s = await _warm_texts(service, args) if args.warm_texts else 0.0
    if not args.preload:
        await service.start()
        gc.freeze()  # as `dinet-broker run` does
    ctx = mp.get_context("spawn")
    out: mp.Queue = ctx.Queue()
    priorities = args.priorities.split(",")
    driver = ctx.Process(target=driver_main, args=(url, topology.namespace, args.requests, args.backlog,
                                                    priorities, args.preload, out, groups, args.prompts,
                                                    args.driver_nice),
                         daemon=True)
    driver.start()
    try:
        await asyncio.to_thread(out.get, True, 300)  # the driver is ready
        if args.preload:
            await service.start()
            gc.freeze()
        cpu_start = time.process_time()
        interference = _Interference()
        interference.start()
        first_at = None
        last_count, last_at = 0, time.monotonic()
        result = None
        while result is None:
            await asyncio.sleep(0.01)
            routed = service.stats.routed_total
            if routed and first_at is None:
                first_at = time.monotonic()
            if routed != last_count:
                last_count, last_at = routed, time.monotonic()
            with contextlib.suppress(Exception):
                _, result = out.get_nowait()
        elapsed = max(1e-9, last_at - (first_at or last_at))
        snap = service.stats.snapshot()
        cpu_s = time.process_time() - cpu_start
        disturbed = interference.stop(snap["routed_total"])
    finally:
        try:
            await service.stop()
            if driver.is_alive():
                driver.join(10)
        finally:
            await _cleanup(url, topology, groups)
    lost = result["published"] - result["distinct_routed"]
    policy = getattr(service.policy, "policy", service.policy)  # an online learner's current policy
    serving = policy.serving_stats() if hasattr(policy, "serving_stats") else {}
    recorder = service._routes
    serving["route_records"] = recorder.records
    serving["route_records_per_entry"] = round(recorder.records / max(1, recorder.batches), 1)
    batcher = service._batcher
    if batcher is not None:
        serving["mean_batch"] = round(batcher.routed / max(1, batcher.batches), 1)
    return {
        "requests": result["published"],
        "routed": snap["routed_total"],
        "routed_per_s": round(snap["routed_total"] / elapsed, 1),
        "sched_p50_ms": snap["sched_p50_ms"],
        "sched_p99_ms": snap["sched_p99_ms"],
        "select_p50_ms": snap["select_p50_ms"],
        "select_p99_ms": snap["select_p99_ms"],
        "lost": lost,
        "duplicates": result["duplicates"],
        "requeued": snap["requeued"],  # each one is routed again: the stub consumer then sees a duplicate
        "crashed": snap["crashed"],
        "reconnects": snap["reconnects"],
        "scheduler": service.policy.name,
        "groups": len(groups),
        "distinct_prompts": args.prompts,
        "texts_warmed_s": warm_s,
        "by_group": snap["by_group"],
        **serving,
        "max_in_flight": args.max_in_flight,
        "driver_publish_s": result["publish_s"],
        "driver_backlog_mean": result["backlog_mean"],
        "driver_nice": args.driver_nice,
        "broker_realtime_priority": args.broker_realtime,  # 0: the normal policy (SCHED_OTHER)
        "loadavg_1m": round(os.getloadavg()[0], 2),
        **disturbed,
        "broker_cpu_per_request_us": round(cpu_s / max(1, snap["routed_total"]) * 1e6, 1),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, python {platform.python_version()}",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="5,000 requests instead of 30,000")
    parser.add_argument("--requests", type=int, default=None)
    parser.add_argument("--amqp-url", default=None)
    parser.add_argument("--scheduler", default="fixed-rule")
    parser.add_argument("--scheduler-model", default="",
                        help="model directory for a learned scheduler (e.g. from `dinet-scheduler train`)")
    parser.add_argument("--groups", type=int, default=4, choices=range(1, 5), metavar="1-4",
                        help="consumer groups the broker sees (default 4: 8 methods x 4 groups per selection)")
    parser.add_argument("--prompts", type=int, default=256, help="distinct prompts in the stream (default 256)")
    parser.add_argument("--no-warm-texts", dest="warm_texts", action="store_false",
                        help="do not embed the prompt pool before measuring (a learned scheduler then runs without "
                             "text dims until the background encoder catches up)")
    parser.add_argument("--batch-routing", action="store_true",
                        help="route the requests of one loop turn with one batched prediction "
                             "(BrokerConfig.batch_routing)")
    parser.add_argument("--max-in-flight", type=int, default=512)
    parser.add_argument("--backlog", type=int, default=2000, help="max requests published but not yet routed")
    parser.add_argument("--driver-nice", type=int, default=0, metavar="N",
                        help="run the load generator (publisher + stub groups) at nice N (default 0: as before, "
                             "so figures stay comparable). On a 2-core machine it competes with the broker "
                             "under test for CPU; agents and nodes do not run on a broker's machine in "
                             "production, and N=10 gives the broker what it would have there. Check "
                             "driver_backlog_mean stays near --backlog (the driver keeps up)")
    parser.add_argument("--broker-realtime", type=int, default=0, metavar="1-99",
                        help="run the broker's loop under SCHED_FIFO at this priority, as `dinet-broker run "
                             "--realtime-priority N` does (default 0: normal scheduling; needs root). The load "
                             "generator and RabbitMQ keep the normal policy")
    parser.add_argument("--no-route-records", dest="route_records", action="store_false",
                        help="do not append routing records to the telemetry stream (BrokerConfig.record_routes; "
                             "reputation then judges nothing): shows what the records cost")
    parser.add_argument("--priorities", default="normal",
                        help="comma list cycled over the requests, e.g. high,normal,batch")
    parser.add_argument("--preload", action="store_true",
                        help="queue every request before the broker starts (measures draining a backlog)")
    args = parser.parse_args(argv)
    args.requests = args.requests or (5000 if args.quick else 30000)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,  # a requeue or reconnect says why on stderr
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    runner = asyncio.run
    with contextlib.suppress(ImportError):
        import uvloop

        runner = uvloop.run  # type: ignore[assignment]
    if os.environ.get("DINET_BENCH_PROFILE"):  # developer aid: cProfile the broker process
        import cProfile

        profiler = cProfile.Profile()
        summary = profiler.runcall(runner, bench(args))
        profiler.dump_stats(os.environ["DINET_BENCH_PROFILE"])
    else:
        summary = runner(bench(args))
    print(json.dumps(summary))
    return 0 if summary["lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
