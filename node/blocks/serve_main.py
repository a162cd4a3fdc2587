"""A block server as a process of its own: ``python -m node.blocks.serve_main --model DIR --blocks 0:2``.

Used by tests and benchmarks (so killing a node is a real SIGKILL) and handy for ops.
It prints one JSON line when it is serving and routable (``address``, ``peer_id``,
``dht_maddrs``), then runs until SIGTERM/SIGINT and stops cleanly (withdrawing its DHT
records). The full node with a task worker is ``dinet-node run``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys

from node.blocks.auth import add_swarm_token_argument, swarm_token_from_env
from node.blocks.chain_engine import ChainConfig
from node.blocks.launch import ServingConfig, start_serving
from node.blocks.tls import add_tls_arguments, tls_from_args


def parse_blocks(text: str) -> tuple[int | None, int | None]:
    """``"3:6"`` -> (3, 6); ``""`` or ``":"`` -> all blocks."""
    if text in ("", ":"):
        return None, None
    try:
        start, end = (int(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--blocks must look like START:END, got {text!r}") from None
    return start, end


def add_serving_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared by this entry and ``dinet-node run``."""
    parser.add_argument("--model", required=True, help="model directory (or hub name) with safetensors weights")
    parser.add_argument("--name", default=None, help="model name announced in the DHT (default: directory name)")
    parser.add_argument("--group", default="default", help="consumer group (default: default)")
    parser.add_argument("--blocks", type=parse_blocks, default=(None, None), help="START:END (default: all)")
    parser.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="gRPC port (default: any free)")
    parser.add_argument("--dht-port", type=int, default=0, help="DHT port (default: any free)")
    parser.add_argument("--initial-peers", nargs="*", default=[], help="DHT multiaddrs to join (default: new swarm)")
    parser.add_argument("--weight-format", choices=["fp32", "bf16", "int8"], default="fp32")
    parser.add_argument("--cache-mb", type=float, default=1024.0, help="KV-cache budget in MiB (default 1024)")
    parser.add_argument("--session-ttl", type=float, default=300.0, help="idle session TTL, seconds (default 300)")
    parser.add_argument("--announce-period", type=float, default=10.0, help="DHT refresh period, s (default 10)")
    parser.add_argument("--record-ttl", type=float, default=30.0, help="DHT record lifetime, s (default 30)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    add_swarm_token_argument(parser)
    parser.add_argument("--no-push", action="store_true",
                        help="never push outputs to the next hop, even when a driver asks (default: push when asked)")
    parser.add_argument("--no-local-blocks", action="store_true",
                        help="as a driver, reach this node's own blocks over gRPC (default: in-process)")
    parser.add_argument("--drive-push", action="store_true",
                        help="as a driver, ask hops to push to each other (default: star mode)")
    add_tls_arguments(parser)


def config_from_args(args: argparse.Namespace) -> ServingConfig:
    """:raises ValueError: for a malformed swarm token or TLS flags (partial, unreadable, not matching)."""
    from pathlib import Path

    start, end = args.blocks
    token = swarm_token_from_env(args.swarm_token)
    tls = tls_from_args(args)
    return ServingConfig(
        model_path=args.model,
        model_name=args.name or Path(args.model).name,
        group=args.group,
        start_block=start,
        end_block=end,
        host=args.host,
        port=args.port,
        dht_port=args.dht_port,
        initial_peers=tuple(args.initial_peers),
        weight_format=args.weight_format,
        cache_bytes=int(args.cache_mb * 1024 * 1024),
        session_ttl_s=args.session_ttl,
        announce_period_s=args.announce_period,
        record_ttl_s=args.record_ttl,
        push=not args.no_push,
        local_blocks=not args.no_local_blocks,
        swarm_token=token,
        tls=tls,
        chain=ChainConfig(push=args.drive_push, swarm_token=token, tls=tls),
    )


async def serve(config: ServingConfig, threads: int) -> int:
    import torch

    from node.hardware import measure_hardware

    if threads > 0:
        torch.set_num_threads(threads)
    handle = await start_serving(config, measure_hardware(weight_format=config.weight_format))
    print(json.dumps({"address": handle.address, "peer_id": handle.peer_id, "dht_maddrs": handle.dht_maddrs}),
          flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await handle.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m node.blocks.serve_main", description=__doc__)
    add_serving_arguments(parser)
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)
    except ValueError as exc:  # a config error is one line and exit 2, not a traceback
        parser.error(str(exc))
    return asyncio.run(serve(config, args.threads))


if __name__ == "__main__":
    sys.exit(main())
