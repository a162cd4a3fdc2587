"""`dinet-broker`: declare the topology, run a broker, or show the operator's view."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import signal
import sys

from broker.priority import RealtimePriorityError
from proto.process import reap_children
from proto.settings import AMQP_URL_ENV, amqp_url_from_env
from proto.topology import DEFAULT_NAMESPACE, PRIORITIES, Topology

logger = logging.getLogger("broker")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--amqp-url", default=None,
                        help=f"RabbitMQ URL (default: ${AMQP_URL_ENV}, else amqp://guest:guest@127.0.0.1:5672/)")
    parser.add_argument("--namespace", default=DEFAULT_NAMESPACE,
                        help="prefix of every queue name; deployments sharing a RabbitMQ use different ones "
                        f"(default: {DEFAULT_NAMESPACE})")


def _directory_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--initial-peers", nargs="*", default=[], metavar="MADDR",
                        help="hivemind DHT multiaddrs to join; live groups are read from node records there")
    parser.add_argument("--static-group", action="append", default=[], metavar="GROUP=MODEL[,MODEL]",
                        help="a consumer group that serves these models, without a DHT (repeatable), "
                        "e.g. --static-group cpu-fp32=tiny")
    parser.add_argument("--group-methods", action="append", default=[], metavar="GROUP=METHOD[,METHOD]",
                        help="the only acceleration methods a group's nodes run (repeatable), e.g. a vLLM group "
                        "built for one method: --group-methods gpu-vllm=continuous_batching,dynamic_batching; "
                        "other groups get every method, or what their DHT records announce")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dinet-broker",
        description="A dinet broker: takes inference requests from RabbitMQ, validates them, picks a method "
        "and a consumer group with the scheduler, and routes each one to that group's queue. Run several "
        "for a cluster; they share the work.",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    sub = parser.add_subparsers(dest="command", required=True)

    init = sub.add_parser("init", help="declare the RabbitMQ queues (idempotent; `run` does it too)",
                          description="Declare the request queues, dead letters, telemetry stream and the "
                          "given group queues. Safe to run any number of times.")
    _common(init)
    init.add_argument("--group", action="append", default=[], help="also declare this group's queue (repeatable)")

    run = sub.add_parser("run", help="run a broker until SIGINT/SIGTERM",
                         description="Consume requests of every priority, route them, and keep node reputations "
                         "from the telemetry stream. Needs at least one --static-group or a DHT "
                         "(--initial-peers or --dht) to know which groups serve which models.")
    _common(run)
    _directory_args(run)
    run.add_argument("--dht", action="store_true",
                     help="start a DHT peer even without --initial-peers (prints the address nodes join)")
    run.add_argument("--broker-id", default=None, help="name in logs and routing decisions (default: host-pid-rand)")
    run.add_argument("--scheduler", default="fixed-rule",
                     help="fixed-rule (default, no dependencies), metainf, or package.module:factory")
    run.add_argument("--scheduler-model", default="", help="model file or directory for a learned scheduler")
    run.add_argument("--max-in-flight", type=int, default=512, help="requests being routed at once (default 512)")
    run.add_argument("--batch-routing", action="store_true",
                     help="route the requests of one event-loop turn with one batched scheduler prediction (more "
                          "requests/s with a learned scheduler; each request waits for its loop turn)")
    run.add_argument("--reputation-threshold", type=float, default=None,
                     help="nodes scoring below this in [0,1] get no work (default 0.5)")
    run.add_argument("--reputation-half-life", type=float, default=None,
                     help="seconds for a node's past behaviour to lose half its weight (default 300)")
    run.add_argument("--realtime-priority", type=int, default=0, metavar="1-99",
                     help="run the routing loop under SCHED_FIFO at this priority so co-located processes "
                          "(RabbitMQ, nodes) cannot preempt a decision; needs root or CAP_SYS_NICE "
                          "(default 0: normal scheduling)")

    status = sub.add_parser("status", help="queue depths, groups, nodes and reputation, rates, dead letters",
                            description="Read-only view of a dinet deployment, as a table or JSON.")
    _common(status)
    _directory_args(status)
    status.add_argument("--json", action="store_true", help="print JSON instead of tables")
    status.add_argument("--window", type=float, default=60.0, help="seconds over which rates are computed")
    return parser


def _static_groups(specs: list[str]) -> dict[str, tuple[str, ...]]:
    from broker.config import parse_static_group

    groups: dict[str, tuple[str, ...]] = {}
    for spec in specs:
        name, models = parse_static_group(spec)
        groups[name] = tuple(dict.fromkeys([*groups.get(name, ()), *models]))
    return groups


def _group_methods(specs: list[str]) -> dict[str, tuple[str, ...]]:
    from broker.config import parse_group_methods

    groups: dict[str, tuple[str, ...]] = {}
    for spec in specs:
        name, methods = parse_group_methods(spec)
        groups[name] = tuple(dict.fromkeys([*groups.get(name, ()), *methods]))
    return groups


async def _init(args: argparse.Namespace) -> int:
    import aio_pika

    topology = Topology(args.namespace)
    connection = await aio_pika.connect(amqp_url_from_env(args.amqp_url), timeout=10)
    try:
        channel = await connection.channel()
        await topology.declare_core(channel, groups=tuple(args.group))
        from broker.deadletters import watch_queue_spec

        await watch_queue_spec(topology).declare(channel)
    finally:
        await connection.close()
    names = [topology.request_queue(p) for p in PRIORITIES] + [topology.dead_letter_queue, topology.telemetry_stream]
    names += [topology.group_queue(g) for g in args.group]
    print("declared: " + ", ".join(names))
    return 0


async def _run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from broker.config import BrokerConfig, ReputationConfig
    from broker.service import BrokerService

    reputation = ReputationConfig()
    if args.reputation_threshold is not None:
        reputation = replace(reputation, threshold=args.reputation_threshold)
    if args.reputation_half_life is not None:
        reputation = replace(reputation, half_life_s=args.reputation_half_life)
    extra = {"broker_id": args.broker_id} if args.broker_id else {}
    config = BrokerConfig(
        amqp_url=amqp_url_from_env(args.amqp_url),
        namespace=args.namespace,
        scheduler=args.scheduler,
        scheduler_model=args.scheduler_model,
        initial_peers=tuple(args.initial_peers),
        dht=args.dht,
        static_groups=_static_groups(args.static_group),
        group_methods=_group_methods(args.group_methods),
        max_in_flight=args.max_in_flight,
        batch_routing=args.batch_routing,
        reputation=reputation,
        realtime_priority=args.realtime_priority,
        **extra,
    )
    if not config.static_groups and not config.use_dht:
        logger.warning("no --static-group and no DHT: every request will get UNKNOWN_MODEL")
    service = BrokerService(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await service.start()
    gc.freeze()  # start-up objects leave the collector's view: shorter GC pauses on the routing path
    print(f"broker {config.broker_id} ready", flush=True)
    await stop.wait()
    logger.info("stopping: finishing requests in hand")
    await service.stop()
    logger.info("stopped; %s", json.dumps(service.stats.snapshot()))
    return 0


async def _status(args: argparse.Namespace) -> int:
    from broker.directory import DhtNodeReader, GroupDirectory
    from broker.status import collect_status, format_status

    reader = await asyncio.to_thread(DhtNodeReader, args.initial_peers) if args.initial_peers else None
    directory = GroupDirectory(_static_groups(args.static_group), reader=reader,
                               group_methods=_group_methods(args.group_methods))
    try:
        await directory.refresh()
        status = await collect_status(amqp_url_from_env(args.amqp_url), Topology(args.namespace),
                                      directory=directory, window_s=args.window)
    finally:
        await directory.close()
    print(json.dumps(status, indent=2) if args.json else format_status(status))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    command = {"init": _init, "run": _run, "status": _status}[args.command]
    runner = asyncio.run
    if args.command == "run":
        with contextlib.suppress(ImportError):
            import uvloop

            runner = uvloop.run  # type: ignore[assignment]
    try:
        return runner(command(args))
    except ValueError as exc:  # bad configuration: say what to fix
        print(f"dinet-broker: {exc}", file=sys.stderr)
        return 2
    except RealtimePriorityError as exc:
        print(f"dinet-broker: {exc}", file=sys.stderr)
        return 2
    except ConnectionError as exc:
        print(f"dinet-broker: cannot reach RabbitMQ ({exc}); check --amqp-url / ${AMQP_URL_ENV}", file=sys.stderr)
        return 1
    finally:
        reap_children()


if __name__ == "__main__":
    sys.exit(main())
