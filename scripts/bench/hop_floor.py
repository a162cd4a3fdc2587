"""What a hop costs on this host with no network stack at all: the floor under ``hop_overhead_ms``.

``scripts/bench/chain.py`` charges the chain ``(chain per-token time - local per-token time) / hops``.
Part of that is gRPC, protobuf and our Python around each message; part is only that the blocks run
in different processes that take turns on the same cores (each wakes from idle, with cold caches,
while the previous one goes to sleep). This benchmark measures the second part alone, so the first
can be read off by difference:

- ``local``: all blocks of the model in this process, one decode step after another (hot), exactly
  what chain.py's ``local`` runs minus the embedding and LM head;
- ``pipes``: the same blocks split over ``--hops`` worker processes (1 torch thread each, like
  chain.py's servers), the driver handing each hop its hidden state over an OS pipe and reading the
  answer back (star order, as the chain's default). No gRPC, no protobuf, no asyncio, no validation.

``pipe_hop_overhead_ms`` = (pipes - local) / hops per decode step. The last line is a JSON object.

    .venv/bin/python scripts/bench/hop_floor.py [--steps 60] [--rounds 5] [--hops 2]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from node.blocks.block_functions import BlockSpan, run_span  # noqa: E402
from node.blocks.kv_cache import SessionCache  # noqa: E402
from node.blocks.loader import load_blocks, load_config  # noqa: E402

READY = b"r"


def read_exactly(fd: int, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = os.read(fd, size - len(data))
        if not chunk:
            raise EOFError("the other end closed its pipe")
        data += chunk
    return data


class Steps:
    """One span's decode steps against a cache that starts over when full (the cost per step stays flat)."""

    def __init__(self, model_dir: Path, start: int, end: int, max_length: int) -> None:
        config = load_config(model_dir)
        self.span = BlockSpan.create(config, load_blocks(model_dir, config, start, end), start)
        self.spec = self.span.cache_spec(start, end, batch=1, max_length=max_length)
        self.cache = SessionCache(self.spec)

    def step(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.cache.length >= self.spec.max_length:
            self.cache = SessionCache(self.spec)
        return run_span(self.span, hidden, position=self.cache.length, cache=self.cache)


def serve(model_dir: Path, start: int, end: int, hidden_size: int, max_length: int) -> None:
    """Worker process: read a [1, 1, H] float32 step from stdin, answer the span's output on stdout."""
    steps = Steps(model_dir, start, end, max_length)
    size = hidden_size * 4
    os.write(1, READY)
    while True:
        try:
            data = read_exactly(0, size)
        except EOFError:
            return
        hidden = torch.frombuffer(bytearray(data), dtype=torch.float32).reshape(1, 1, hidden_size)
        os.write(1, steps.step(hidden).numpy().tobytes())


def measure_floor(model_dir: Path, *, hops: int, steps: int, rounds: int) -> dict[str, float]:
    """Medians of ms per decode step for ``local`` (one hot process) and ``pipes`` (``hops`` workers), interleaved.

    Leaves this process's torch thread count as it found it (the workers get 1 thread, like chain.py's servers).
    """
    config = load_config(model_dir)
    hidden_size, layers = int(config.hidden_size), int(config.num_hidden_layers)
    if not 1 <= hops <= layers:
        raise ValueError(f"hops must be in 1..{layers}")
    bounds = [layers * i // hops for i in range(hops + 1)]
    workers = [
        subprocess.Popen([sys.executable, __file__, "--model", str(model_dir), "--steps", str(steps),
                          "--serve", str(a), str(b)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
        for a, b in itertools.pairwise(bounds)
    ]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pipes = [(w.stdin.fileno(), w.stdout.fileno()) for w in workers if w.stdin and w.stdout]
        for _, out in pipes:
            if read_exactly(out, 1) != READY:
                raise RuntimeError("a worker did not start")
        local = Steps(model_dir, 0, layers, steps + 8)
        hidden = torch.randn(1, 1, hidden_size, generator=torch.Generator().manual_seed(0)) * 0.1
        size = hidden_size * 4

        def through_pipes() -> None:
            x = hidden
            for into, out in pipes:
                os.write(into, x.numpy().tobytes())
                x = torch.frombuffer(bytearray(read_exactly(out, size)), dtype=torch.float32).reshape(1, 1, -1)

        def on_local() -> None:
            local.step(hidden)

        def timed(step: Callable[[], None]) -> float:
            begin = time.perf_counter()
            for _ in range(steps):
                step()
            return (time.perf_counter() - begin) / steps * 1000.0

        results: dict[str, list[float]] = {"local": [], "pipes": []}
        timed(through_pipes)  # warm-up
        timed(on_local)
        for _ in range(rounds):  # interleaved, so both see the same machine
            results["pipes"].append(timed(through_pipes))
            results["local"].append(timed(on_local))
    finally:
        torch.set_num_threads(threads)
        for worker in workers:
            if worker.stdin:
                worker.stdin.close()
        for worker in workers:
            worker.wait(timeout=30)
    local_ms, pipes_ms = (statistics.median(results[k]) for k in ("local", "pipes"))
    print(f"hop floor: local {local_ms:.2f} ms/step | {hops} hops over pipes {pipes_ms:.2f} ms/step | per round: "
          f"local {[round(v, 1) for v in results['local']]} pipes {[round(v, 1) for v in results['pipes']]}",
          file=sys.stderr)
    return {"local_ms_per_step": round(local_ms, 3), "pipes_ms_per_step": round(pipes_ms, 3),
            "pipe_hop_overhead_ms": round((pipes_ms - local_ms) / hops, 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / ".cache" / "models" / "small"))
    parser.add_argument("--hops", type=int, default=2)
    parser.add_argument("--steps", type=int, default=60, help="decode steps per round (default 60)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds; medians are reported (default 5)")
    parser.add_argument("--serve", nargs=2, type=int, metavar=("START", "END"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    model_dir = Path(args.model)
    if not (model_dir / "config.json").exists():
        print(f"build the model first: dinet-node make-model {model_dir} --preset small", file=sys.stderr)
        return 2
    if args.serve:
        torch.set_num_threads(1)
        config = load_config(model_dir)
        serve(model_dir, args.serve[0], args.serve[1], int(config.hidden_size), args.steps + 8)
        return 0
    if args.steps < 1 or args.rounds < 1:
        parser.error("--steps and --rounds must be at least 1")
    load_before = os.getloadavg()[0]
    try:
        floor = measure_floor(model_dir, hops=args.hops, steps=args.steps, rounds=args.rounds)
    except ValueError as exc:
        parser.error(str(exc))
    print(json.dumps({
        "model": model_dir.name, "hops": args.hops, "steps": args.steps, "rounds": args.rounds, **floor,
        "cpus": os.cpu_count(), "loadavg_before": round(load_before, 2),
        "loadavg_after": round(os.getloadavg()[0], 2),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
