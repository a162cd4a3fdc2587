"""Run one accelerated block server as its own process (benchmarks, local clusters).

``python -m node.accel.serve --model DIR --blocks 0:6 --port 0 [--weight-format bf16] [--threads 2]
[--delay-ms 5]`` prints ``READY host:port`` on stdout once it serves, then runs until SIGTERM/SIGINT.
``--delay-ms`` holds every reply that long: an emulated one-way network delay for hardware-profile
experiments where ``tc netem`` between network namespaces is not available. ``--swarm-token`` (default
``$DINET_SWARM_TOKEN``) and ``--tls-*`` make it a private swarm member like ``dinet-node run``'s servers:
calls without the token get UNAUTHENTICATED (drivers: ``AccelChain(swarm_token=...)``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from pathlib import Path

import torch

from node.accel.batching import BatchPolicy
from node.accel.server import AccelBlockServer, AccelServerConfig
from node.blocks.auth import add_swarm_token_argument, swarm_token_from_env
from node.blocks.tls import add_tls_arguments, tls_from_args


def parse_blocks(text: str) -> tuple[int, int]:
    """``"START:END"`` -> (start, end). :raises argparse.ArgumentTypeError: when malformed."""
    try:
        start, end = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--blocks must be START:END, got {text!r}") from None
    if not 0 <= start < end:
        raise argparse.ArgumentTypeError(f"--blocks needs 0 <= START < END, got {text!r}")
    return start, end


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m node.accel.serve", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, type=Path, help="local model directory")
    parser.add_argument("--model-name", default="", help="name peers use (default: the directory name)")
    parser.add_argument("--blocks", required=True, type=parse_blocks, help="START:END blocks to serve")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--weight-format", default="fp32", choices=("fp32", "bf16", "int8"))
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch default)")
    parser.add_argument("--max-batch", type=int, default=16, help="sessions per batched forward")
    parser.add_argument("--max-batch-tokens", type=int, default=256, help="new tokens per batched forward")
    parser.add_argument("--prefix-block", type=int, default=32, help="prefix-cache granularity in tokens")
    parser.add_argument("--gather-ms", type=float, default=BatchPolicy.gather_ms,
                        help="continuous batching: longest wait for the other open sessions")
    parser.add_argument("--gap-ms", type=float, default=BatchPolicy.gap_ms,
                        help="...cut short once no step arrived for this long")
    parser.add_argument("--cohort-gap-ms", type=float, default=BatchPolicy.cohort_gap_ms,
                        help="...or for this long once the first step's cohort is back")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="emulated network delay added to each reply")
    add_swarm_token_argument(parser)
    add_tls_arguments(parser)
    return parser


def config_from_args(args: argparse.Namespace) -> AccelServerConfig:
    """:raises ValueError: for a malformed swarm token or TLS flags (partial, unreadable, not matching)."""
    start, end = args.blocks
    return AccelServerConfig(
        model_path=args.model,
        model_name=args.model_name or args.model.name,
        start=start,
        end=end,
        weight_format=args.weight_format,
        policy=BatchPolicy(max_seqs=args.max_batch, max_tokens=args.max_batch_tokens, gather_ms=args.gather_ms,
                           gap_ms=args.gap_ms, cohort_gap_ms=args.cohort_gap_ms),
        prefix_block_tokens=args.prefix_block,
        host=args.host,
        port=args.port,
        reply_delay_s=args.delay_ms / 1000.0,
        swarm_token=swarm_token_from_env(args.swarm_token),
        tls=tls_from_args(args),
    )


async def serve(config: AccelServerConfig) -> None:
    server = await AccelBlockServer.create(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"READY {server.address}", flush=True)
    try:
        await stop.wait()
    finally:
        stats = server.servicer.batcher.stats
        print(f"STATS forwards={stats.forwards} steps={stats.steps} forward_s={stats.forward_s:.1f} "
              f"gather_s={stats.gather_s:.1f} batch_sizes={sorted(stats.batch_sizes.items())} ms_per_forward="
              f"{ {n: round(1000 * t / stats.batch_sizes[n], 1) for n, t in sorted(stats.forward_s_by_size.items())} }",
              file=sys.stderr, flush=True)
        await server.close(grace=0.5)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if min(args.threads, args.delay_ms, args.gather_ms, args.gap_ms, args.cohort_gap_ms) < 0:
        print("--threads, --delay-ms and the waits must be non-negative", file=sys.stderr)
        return 2
    try:
        config = config_from_args(args)
    except ValueError as exc:  # one line and exit 2, not a traceback
        parser.error(str(exc))
    if args.threads:
        torch.set_num_threads(args.threads)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
