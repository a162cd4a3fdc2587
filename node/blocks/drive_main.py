"""Drive one greedy request through the swarm and print the result:
``python -m node.blocks.drive_main --model DIR --initial-peers MADDR ... --prompt-ids 5,17,200``.

A driver as a process of its own, for tests that place it in another network namespace
and for checking a swarm by hand. Prints one JSON line: the token ids, the route's hops
and the per-token decode time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

from node.blocks.auth import add_swarm_token_argument, swarm_token_from_env
from node.blocks.chain_engine import ChainConfig, ChainEngine
from node.blocks.dht import SwarmDHT
from node.blocks.tls import TlsConfig, add_tls_arguments, tls_from_args
from node.engine import GenerationRequest


async def drive(args: argparse.Namespace, tls: TlsConfig | None = None, swarm_token: str = "") -> dict:
    dht = await asyncio.to_thread(SwarmDHT.start, initial_peers=args.initial_peers, host=args.host,
                                  client_mode=True)
    engine = ChainEngine(model_path=args.model, model_name=args.name or Path(args.model).name, records=dht,
                         config=ChainConfig(step_timeout_s=args.step_timeout, push=args.push, tls=tls,
                                            swarm_token=swarm_token))
    try:
        hops: list[str] = []
        tokens: list[int] = []
        stamps: list[float] = []
        request = GenerationRequest(prompt_ids=tuple(args.prompt_ids), max_new_tokens=args.max_new_tokens)
        async for token in engine.generate(request):
            if not hops:
                (session,) = engine.sessions
                hops = [f"{h.address}/{h.start}:{h.end}" for h in session.hops]
            tokens.append(token)
            stamps.append(time.perf_counter())
        per_token = (stamps[-1] - stamps[0]) / max(len(stamps) - 1, 1) * 1000 if len(stamps) > 1 else 0.0
        return {"tokens": tokens, "hops": hops, "decode_ms_per_token": round(per_token, 3),
                "push": args.push}
    finally:
        await engine.close()
        await asyncio.to_thread(dht.shutdown)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m node.blocks.drive_main", description=__doc__)
    parser.add_argument("--model", required=True, help="model directory (config, embeddings and head are read)")
    parser.add_argument("--name", default=None, help="model name in the DHT (default: directory name)")
    parser.add_argument("--initial-peers", nargs="+", required=True)
    parser.add_argument("--host", default="127.0.0.1", help="address of this driver's DHT client")
    parser.add_argument("--prompt-ids", type=lambda s: [int(t) for t in s.split(",")], required=True)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--step-timeout", type=float, default=30.0)
    parser.add_argument("--push", action="store_true",
                        help="hops push each step to the next hop (default: star, the driver carries every hop)")
    add_tls_arguments(parser)  # a TLS swarm only lets in drivers with a certificate from its CA
    add_swarm_token_argument(parser)  # a private swarm only answers calls that carry its token
    args = parser.parse_args(argv)
    try:
        tls = tls_from_args(args)
        token = swarm_token_from_env(args.swarm_token)
    except ValueError as exc:
        parser.error(str(exc))
    print(json.dumps(asyncio.run(drive(args, tls, token))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
