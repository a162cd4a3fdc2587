"""Sharded chain vs one process: greedy decode speed of the `small` model on loopback.

Measures, on one prompt:
- ``single``: transformers ``generate`` on the whole model in this process (the reference);
- ``local``: the same blocks through node.blocks.block_functions in this process (no network),
  which isolates what the network adds;
- ``chain2`` / ``chain3``: ChainEngine driving 2 / 3 block-server processes found through
  the real DHT, all on loopback, in its default star mode (the driver carries every hop:
  driver -> s1 -> driver -> s2 -> ..., 2n messages per token);
- ``chain2_push`` / ``chain3_push``: the same servers in push mode (each hop pushes its output
  to the next: driver -> s1 -> s2 -> s3 -> driver on the critical path, n + 1 messages, plus
  each hop's answer to the driver off it).
- ``chain2_own`` / ``chain3_own``: 2 / 3 nodes where the driver is a node serving the first span
  itself, as ``dinet-node run --blocks`` drives (node/blocks/local_span.py): it runs those blocks
  in-process and calls the other 1 / 2 servers (those of chain2 / chain3, the first one left out
  of its records), so 2 / 4 messages per token.

Decode speed is tokens/s after the first token (prefill excluded, reported apart).
``hop_overhead_ms`` = (chain3 per-token time - local per-token time) / 3: what one hop adds
per token (default star mode; ``hop_overhead_ms_push`` for push mode). ``hop_floor_ms`` is what a hop
costs on this host with no network stack at all (scripts/bench/hop_floor.py: the same 3 spans in worker
processes handing hidden states over OS pipes, measured right after, unless ``--no-floor``), so
``hop_overhead_ms - hop_floor_ms`` is roughly what gRPC and our code add. ``hop_overhead_ms_own`` =
(chain3_own per-token time - local per-token time) / 2: per network hop when the driver holds the first
span (``chain2_own_ratio`` = chain2_own / single). The driver's own compute
(embedding, LM head) runs with ``--driver-threads`` torch threads, like ``local``.
The last line is a JSON object.

    .venv/bin/python scripts/bench/chain.py [--quick] [--model .cache/models/small]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from node.blocks.block_functions import BlockSpan, run_span  # noqa: E402
from node.blocks.chain_engine import ChainConfig, ChainEngine  # noqa: E402
from node.blocks.dht import SwarmDHT  # noqa: E402
from node.blocks.kv_cache import CacheManager, SessionCache  # noqa: E402
from node.blocks.loader import load_blocks, load_config, load_driver_parts  # noqa: E402
from node.blocks.local_span import LocalBlocks  # noqa: E402
from node.blocks.server import BlockServicer, ServerLimits  # noqa: E402
from node.engine import GenerationRequest  # noqa: E402
from proto.records import BlockRecord  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hop_floor import measure_floor  # noqa: E402


def decode_rate(stamps: list[float], start: float) -> tuple[float, float]:
    """(prefill seconds, decode tokens/s) from per-token timestamps."""
    prefill = stamps[0] - start
    return prefill, (len(stamps) - 1) / max(stamps[-1] - stamps[0], 1e-9)


class Stamps:
    """A transformers streamer that timestamps each generated token."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.calls = 0

    def put(self, value: torch.Tensor) -> None:
        self.calls += 1
        if self.calls > 1:  # the first put is the prompt
            self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


class Single:
    """transformers ``generate`` on the whole model in this process."""

    def __init__(self, model_dir: Path) -> None:
        from transformers import LlamaForCausalLM

        self.model = LlamaForCausalLM.from_pretrained(model_dir).eval()

    def run(self, prompt: list[int], new: int) -> tuple[list[int], float, float]:
        ids = torch.tensor([prompt])
        streamer = Stamps()
        start = time.perf_counter()
        out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                                  streamer=streamer)
        prefill, rate = decode_rate(streamer.times, start)
        return out[0, len(prompt):].tolist(), prefill, rate


class Local:
    """All blocks through node.blocks.block_functions in this process: the chain minus the network."""

    def __init__(self, model_dir: Path, threads: int) -> None:
        self.threads = threads
        config = load_config(model_dir)
        self.span = BlockSpan.create(config, load_blocks(model_dir, config, 0, config.num_hidden_layers), 0)
        self.driver = load_driver_parts(model_dir, config)

    def run(self, prompt: list[int], new: int) -> tuple[list[int], float, float]:
        threads = torch.get_num_threads()
        torch.set_num_threads(self.threads)  # what each block server gets
        try:
            return self._run(prompt, new)
        finally:
            torch.set_num_threads(threads)

    def _run(self, prompt: list[int], new: int) -> tuple[list[int], float, float]:
        cache = SessionCache(self.span.cache_spec(0, self.span.end, batch=1, max_length=len(prompt) + new))
        start = time.perf_counter()
        hidden = self.driver.embed_ids(torch.tensor([prompt]))
        tokens, stamps = [], []
        for _ in range(new):
            out = run_span(self.span, hidden, position=cache.length, cache=cache)
            tokens.append(int(self.driver.logits(out[:, -1:])[0, -1].argmax()))
            stamps.append(time.perf_counter())
            hidden = self.driver.embed_ids(torch.tensor([[tokens[-1]]]))
        prefill, rate = decode_rate(stamps, start)
        return tokens, prefill, rate


def spawn(
    model_dir: Path, name: str, blocks: str, peers: list[str], threads: int
) -> tuple[subprocess.Popen[str], dict]:
    cmd = [sys.executable, "-m", "node.blocks.serve_main", "--model", str(model_dir), "--name", name,
           "--blocks", blocks, "--threads", str(threads), "--initial-peers", *peers]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env, start_new_session=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("{"):
        proc.kill()
        raise RuntimeError(f"server {blocks} did not start")
    return proc, json.loads(line)


class Chain:
    """ChainEngine over block-server processes (one DHT for all benchmarks)."""

    def __init__(self, engine: ChainEngine, threads: int) -> None:
        self.engine = engine
        self.threads = threads

    async def run(self, prompt: list[int], new: int) -> tuple[list[int], float, float]:
        threads = torch.get_num_threads()
        torch.set_num_threads(self.threads)  # the driver's embedding and LM head, next to 2-3 servers
        try:
            return await self._run(prompt, new)
        finally:
            torch.set_num_threads(threads)

    async def _run(self, prompt: list[int], new: int) -> tuple[list[int], float, float]:
        stamps: list[float] = []
        tokens: list[int] = []
        start = time.perf_counter()
        async for token in self.engine.generate(GenerationRequest(prompt_ids=tuple(prompt), max_new_tokens=new)):
            stamps.append(time.perf_counter())
            tokens.append(token)
        prefill, rate = decode_rate(stamps, start)
        return tokens, prefill, rate


class BeyondOwn:
    """The swarm's records of blocks from ``start`` on: a 2-/3-node chain whose driver holds the blocks before."""

    def __init__(self, dht: SwarmDHT, start: int) -> None:
        self.dht = dht
        self.start = start

    async def block_records(self, model: str, num_blocks: int) -> list[BlockRecord]:
        return [r for r in await self.dht.block_records(model, num_blocks) if r.start_block >= self.start]


def own_blocks(model_dir: Path, end: int) -> LocalBlocks:
    """Blocks 0:end in this process, wired to a driver as node.blocks.launch does for a serving node."""
    config = load_config(model_dir)
    span = BlockSpan.create(config, load_blocks(model_dir, config, 0, end), 0)
    caches = CacheManager(budget_bytes=1 << 30, ttl_s=300)
    servicer = BlockServicer(span=span, model_name=model_dir.name, caches=caches, limits=ServerLimits())
    record = BlockRecord(peer_id="driver", address="in-process", group="bench", start_block=0, end_block=end)
    return LocalBlocks(steps=servicer.steps, caches=caches, max_length=servicer.max_length, record=lambda: record)


async def run_all(
    model_dir: Path, prompt: list[int], new: int, rounds: int, threads: int, driver_threads: int
) -> dict[str, list[tuple]]:
    layers = int(load_config(model_dir).num_hidden_layers)
    third, half = layers // 3, layers // 2
    layouts = {"chain2": [f"0:{half}", f"{half}:{layers}"],
               "chain3": [f"0:{third}", f"{third}:{2 * third}", f"{2 * third}:{layers}"]}
    procs: list[subprocess.Popen[str]] = []
    peers: list[str] = []
    try:
        for name, ranges in layouts.items():
            for blocks in ranges:
                proc, info = spawn(model_dir, name, blocks, peers, threads)
                procs.append(proc)
                peers = peers or info["dht_maddrs"]
        dht = await asyncio.to_thread(SwarmDHT.start, initial_peers=peers, client_mode=True)
        engines = {
            f"{name}{suffix}": ChainEngine(model_path=str(model_dir), model_name=name, records=dht,
                                           config=ChainConfig(push=push))
            for name in layouts for suffix, push in (("", False), ("_push", True))
        }
        for name, ranges in layouts.items():  # the driver holds the first span itself
            own_end = int(ranges[0].split(":")[1])
            engines[f"{name}_own"] = ChainEngine(model_path=str(model_dir), model_name=name,
                                                 records=BeyondOwn(dht, own_end), local=own_blocks(model_dir, own_end))
        runners: dict[str, object] = {"single": Single(model_dir), "local": Local(model_dir, threads)}
        runners.update({name: Chain(engine, driver_threads) for name, engine in engines.items()})
        results: dict[str, list[tuple]] = {name: [] for name in runners}
        for round_ in range(rounds + 1):  # round 0 warms up (connections, routes, allocator)
            for name, runner in runners.items():
                outcome = runner.run(prompt, new if round_ else 4)  # type: ignore[attr-defined]
                if asyncio.iscoroutine(outcome):
                    outcome = await outcome
                if round_:
                    results[name].append(outcome)
        for engine in engines.values():
            await engine.close()
        await asyncio.to_thread(dht.shutdown)
        return results
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=20)
            finally:  # the server's DHT child and p2pd too, should it not have stopped them
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / ".cache" / "models" / "small"))
    parser.add_argument("--quick", action="store_true", help="fewer tokens (CI-sized run)")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--server-threads", type=int, default=1,
                        help="torch threads per block server, and for the local baseline (default 1: on a 2-core "
                        "host, 2-3 servers with 2 threads each only fight over the cores)")
    parser.add_argument("--no-floor", action="store_true",
                        help="skip the pipe floor measurement (scripts/bench/hop_floor.py) after the chains")
    parser.add_argument("--driver-threads", type=int, default=1,
                        help="torch threads of the chain driver's embedding and LM head (default 1, like local)")
    args = parser.parse_args()
    model_dir = Path(args.model)
    if not (model_dir / "config.json").exists():
        print(f"build the model first: dinet-node make-model {model_dir} --preset small", file=sys.stderr)
        return 2
    new, rounds = (24, 2) if args.quick else (64, 4)
    prompt = [100 + (i * 37) % 4000 for i in range(args.prompt_tokens)]
    load_before = os.getloadavg()[0]
    results = asyncio.run(run_all(model_dir, prompt, new, rounds, args.server_threads, args.driver_threads))
    floor = None if args.no_floor else measure_floor(model_dir, hops=3, steps=new, rounds=2 * rounds + 1)
    rate = {name: statistics.median(r[2] for r in runs) for name, runs in results.items()}
    prefill = {name: round(statistics.median(r[1] for r in runs) * 1000, 1) for name, runs in results.items()}
    tokens = {name: runs[0][0] for name, runs in results.items()}
    single, local, chain2, chain3 = rate["single"], rate["local"], rate["chain2"], rate["chain3"]
    per_token = {name: 1000.0 / value for name, value in rate.items()}
    result = {
        "model": model_dir.name,
        "new_tokens": new,
        "prompt_tokens": len(prompt),
        "rounds": rounds,
        "single_tok_s": round(single, 2),
        "local_blocks_tok_s": round(local, 2),
        "chain2_tok_s": round(chain2, 2),
        "chain3_tok_s": round(chain3, 2),
        "chain2_ratio": round(chain2 / single, 3),
        "chain3_ratio": round(chain3 / single, 3),
        "chain2_vs_local": round(chain2 / local, 3),
        "chain2_push_tok_s": round(rate["chain2_push"], 2),
        "chain3_push_tok_s": round(rate["chain3_push"], 2),
        "hop_overhead_ms_chain2": round((per_token["chain2"] - per_token["local"]) / 2, 3),
        "hop_overhead_ms_push": round((per_token["chain3_push"] - per_token["local"]) / 3, 3),
        "hop_overhead_ms_chain2_push": round((per_token["chain2_push"] - per_token["local"]) / 2, 3),
        "chain2_own_tok_s": round(rate["chain2_own"], 2),
        "chain3_own_tok_s": round(rate["chain3_own"], 2),
        "chain2_own_ratio": round(rate["chain2_own"] / single, 3),
        "chain2_own_vs_local": round(rate["chain2_own"] / local, 3),
        "hop_overhead_ms_own_chain2": round(per_token["chain2_own"] - per_token["local"], 3),
        "hop_overhead_ms_own": round((per_token["chain3_own"] - per_token["local"]) / 2, 3),
        "prefill_ms": prefill,
        "identical_tokens": len({tuple(t) for t in tokens.values()}) == 1,
        "hop_floor_ms": floor["pipe_hop_overhead_ms"] if floor else None,
        "hop_overhead_ms": round((per_token["chain3"] - per_token["local"]) / 3, 3),
        "single_threads": torch.get_num_threads(),
        "server_threads": args.server_threads,
        "driver_threads": args.driver_threads,
        "cpus": os.cpu_count(),
        "loadavg_before": round(load_before, 2),
        "loadavg_after": round(os.getloadavg()[0], 2),
    }
    print(f"single {single:.1f} tok/s | local blocks {local:.1f} | chain2 {chain2:.1f} | chain3 {chain3:.1f} | "
          f"push: chain2 {rate['chain2_push']:.1f} chain3 {rate['chain3_push']:.1f} | "
          f"own: chain2 {rate['chain2_own']:.1f} chain3 {rate['chain3_own']:.1f}", file=sys.stderr)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
