"""Benchmark every acceleration method over a grid of workloads on a 2-node chain of the small model.

Grid: concurrency 1/4/16 x prompt 32/512 tokens x shared prefix 0%/90% x output 16/128 tokens, plus a
repetitive-text workload for prompt lookup, under >= 3 emulated hardware profiles (torch thread count,
weight format, emulated network delay per hop). Two block servers run as separate processes
(``python -m node.accel.serve``); this process drives requests through them with
:class:`node.accel.chain.AccelChain`.

Each cell runs ``concurrency`` requests at once (scripts/bench/methods_measure.py): the prefill
phase always runs until every request has its first token (TTFT); then decode throughput is
measured over ``--window-s`` with every request in flight. Cells that finish within the window
are measured exactly; otherwise throughput and p99 latency are projected from each request's rate
in the window (column ``complete`` says which). No wall-clock cap decides a cell.

Writes the cells as a meta-training dataset in the scheduler's format (docs/scheduler.md), a PNG of
throughput per method and workload, prints a table, and prints as its last line a JSON object with
``cb_speedup_c16``, ``prefix_ttft_speedup``, ``spec_speedup`` and ``rows``.

Usage: ``.venv/bin/python scripts/bench/methods.py [--quick] [--out DIR] [--plot PNG]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import torch  # noqa: E402

from node.accel.chain import AccelChain, Hop  # noqa: E402
from node.accel.draft import DraftModelConfig, load_draft_model  # noqa: E402
from node.accel.executor import ModelHead  # noqa: E402
from proto.methods import METHODS  # noqa: E402
from scripts.bench.methods_measure import CellResult, run_requests  # noqa: E402
from scripts.bench.methods_report import print_table, ratio, write_partial, write_plot  # noqa: E402

logger = logging.getLogger("bench.methods")


@dataclass(frozen=True)
class Profile:
    """An emulated consumer group: how its nodes compute and how far apart they are."""

    name: str
    threads: int  # torch intra-op threads per block server
    weight_format: str  # fp32 | bf16 | int8
    delay_ms: float  # emulated network delay added to every hop's reply
    price_per_hour: float  # operator price, budget units

    @property
    def text(self) -> str:
        return (f"CPU node, {self.threads} thread(s), {self.weight_format} weights, "
                f"{self.delay_ms:g} ms emulated delay per hop")


@dataclass(frozen=True)
class Workload:
    concurrency: int
    prompt_tokens: int
    shared_prefix: float  # fraction of the prompt shared by all requests (and a warm-up request)
    max_new_tokens: int
    repetitive: bool = False  # prompt is one short snippet repeated (prompt lookup's best case)

    @property
    def name(self) -> str:
        kind = "rep" if self.repetitive else "txt"
        return (f"{kind}-c{self.concurrency}-p{self.prompt_tokens}-s{int(self.shared_prefix * 100)}"
                f"-o{self.max_new_tokens}")


PROFILES = [
    # one thread per server: the two hops of the chain get a core each on a 2-core machine
    Profile("cpu1-fp32-lan", threads=1, weight_format="fp32", delay_ms=0.0, price_per_hour=1.0),
    Profile("cpu1-int8-lan", threads=1, weight_format="int8", delay_ms=1.0, price_per_hour=0.5),
    # two threads per server: oversubscribed cores, and a WAN-like delay per hop
    Profile("cpu2-fp32-wan", threads=2, weight_format="fp32", delay_ms=10.0, price_per_hour=0.7),
]
# selectable with --profile-names, not in the default run: torch's bf16 path on this CPU is slow, bf16
# prefill is ~6x slower than fp32 here (9.7 s TTFT for one 512-token prompt), so its c16 x 512-token
# cells alone would take ~40 minutes
EXTRA_PROFILES = [
    Profile("cpu1-bf16-lan", threads=1, weight_format="bf16", delay_ms=1.0, price_per_hour=0.5),
    Profile("cpu2-int8-wan", threads=2, weight_format="int8", delay_ms=10.0, price_per_hour=0.7),
]
ALL_METHODS = ["baseline", "dynamic_batching", "continuous_batching", "prefix_caching", "chunked_prefill",
               "spec_ngram", "all"]
FEW_METHODS = ["baseline", "continuous_batching", "prefix_caching", "spec_ngram"]


def full_grid() -> list[Workload]:
    grid = [Workload(c, p, s, o) for c in (1, 4, 16) for p in (32, 512) for s in (0.0, 0.9) for o in (16, 128)]
    return [*grid, Workload(1, 64, 0.0, 128, repetitive=True), Workload(4, 64, 0.0, 128, repetitive=True)]


def quick_grid() -> list[Workload]:
    return [Workload(16, 32, 0.0, 128), Workload(1, 512, 0.9, 16), Workload(1, 64, 0.0, 64, repetitive=True)]


# -- processes ------------------------------------------------------------------------------------


class ServerProcs:
    """Two block servers of one profile, as child processes."""

    def __init__(self, model: Path, profile: Profile, splits: list[tuple[int, int]],
                 extra: tuple[str, ...] = ()) -> None:
        self.procs: list[subprocess.Popen[str]] = []
        self.addresses: list[str] = []
        env = {**os.environ, "OMP_NUM_THREADS": str(profile.threads), "PYTHONPATH": str(ROOT)}
        for start, end in splits:
            proc = subprocess.Popen(
                [sys.executable, "-m", "node.accel.serve", "--model", str(model), "--model-name", model.name,
                 "--blocks", f"{start}:{end}", "--weight-format", profile.weight_format,
                 "--threads", str(profile.threads), "--delay-ms", str(profile.delay_ms), *extra],
                stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT,
            )
            self.procs.append(proc)
        for proc in self.procs:
            line = proc.stdout.readline() if proc.stdout else ""
            if not line.startswith("READY "):
                self.stop()
                raise RuntimeError(f"block server did not start (got {line!r})")
            self.addresses.append(line.split()[1])

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


# -- prompts --------------------------------------------------------------------------------------


class PromptSource:
    """Token ids of the tokenizer corpus, cut into prompts; every cell gets text no other cell used."""

    def __init__(self, model: Path) -> None:
        from transformers import AutoTokenizer

        from node.model_builder import corpus_text

        tokenizer = AutoTokenizer.from_pretrained(model)
        self.ids: list[int] = tokenizer(corpus_text()[:400_000])["input_ids"]
        self.cursor = 0

    def take(self, n: int) -> list[int]:
        if self.cursor + n > len(self.ids):
            self.cursor = 0
        out = self.ids[self.cursor : self.cursor + n]
        self.cursor += n
        return out

    def prompts(self, w: Workload, count: int) -> list[list[int]]:
        if w.repetitive:
            snippet = self.take(16)
            body = (snippet * (w.prompt_tokens // 16 + 1))[: w.prompt_tokens - 1]
            return [[*body, self.take(1)[0]] for _ in range(count)]
        shared = self.take(int(w.prompt_tokens * w.shared_prefix))
        return [shared + self.take(w.prompt_tokens - len(shared)) for _ in range(count)]


# -- one cell -------------------------------------------------------------------------------------


async def run_cell(chain: AccelChain, prompts: list[list[int]], w: Workload, method: str,
                   args: argparse.Namespace) -> CellResult:
    """``prompts``: ``concurrency`` measured prompts plus one warm-up prompt sharing their prefix."""
    if w.shared_prefix > 0:  # recent traffic with the same prefix; fills the prefix caches of methods using them
        await run_requests(chain, prompts[-1:], method, 1, window_s=args.window_s, safety_s=args.safety_s)
    result = await run_requests(chain, prompts[: w.concurrency], method, w.max_new_tokens,
                                window_s=args.window_s, safety_s=args.safety_s)
    await drain(chain)
    return result


async def drain(chain: AccelChain, timeout_s: float = 60.0) -> None:
    """Wait until no session is open on any hop: steps of cancelled requests still finish on the servers,
    and the next cell must not pay for them."""
    from proto import blocks_pb2

    deadline = time.monotonic() + timeout_s
    for hop in await chain.route():
        while time.monotonic() < deadline:
            info = await chain._stub(hop.address).Info(blocks_pb2.InfoRequest(), timeout=5)
            if info.active_sessions == 0:
                break
            await asyncio.sleep(0.05)


# -- dataset, table, plot -------------------------------------------------------------------------


def weight_bits(fmt: str) -> float:
    return {"fp32": 32.0, "bf16": 16.0, "int8": 8.0}[fmt]


def make_row(profile: Profile, w: Workload, method: str, r: CellResult) -> dict[str, object]:
    m = METHODS[method]
    row: dict[str, object] = {
        "task": w.name,
        "method": method,
        "hardware": profile.name,
        "performance": r.throughput,
        "runtime_s": r.elapsed_s,
        "ttft_s": r.ttft_s,
        "prefill_s": r.prefill_s,
        "decode_tps": r.decode_tps,
        "decode_window_s": r.decode_window_s,
        "p99_latency_s": r.p99_latency_s,
        "tokens": r.tokens,
        "complete": r.complete,
        "capped": r.capped,
        "task_text": (f"{w.concurrency} concurrent requests, {w.prompt_tokens}-token "
                      f"{'repetitive' if w.repetitive else 'prose'} prompts sharing {w.shared_prefix:.0%} "
                      f"of their tokens, {w.max_new_tokens} new tokens each"),
        "method_text": f"{method}: {m}",
        "hardware_text": profile.text,
        "task.prompt_tokens": float(w.prompt_tokens),
        "task.max_new_tokens": float(w.max_new_tokens),
        "task.shared_prefix": w.shared_prefix,
        "task.concurrency": float(w.concurrency),
        "task.repetitive": float(w.repetitive),
        "hw.threads": float(profile.threads),
        "hw.weight_bits": weight_bits(profile.weight_format),
        "hw.delay_ms": profile.delay_ms,
        "cost_per_hour": profile.price_per_hour,
    }
    row.update(m.features())
    return row


# -- main -----------------------------------------------------------------------------------------


async def bench(args: argparse.Namespace) -> list[dict[str, object]]:
    model = args.model
    source = PromptSource(model)
    head = ModelHead.load(model)
    layers = int(head.config.num_hidden_layers)
    splits = [(0, layers // 2), (layers // 2, layers)]
    profiles = PROFILES[:1] if args.quick else PROFILES[: args.profiles]
    if args.profile_names:
        known = {p.name: p for p in [*PROFILES, *EXTRA_PROFILES]}
        profiles = [known[name] for name in args.profile_names.split(",")]
    grid = quick_grid() if args.quick else full_grid()
    if args.workloads:  # focused runs: only the named workloads of the chosen grid
        grid = [w for w in grid if w.name in args.workloads.split(",")]
    draft = None
    if args.draft_model is not None:  # spec_draft drafts with it; validated against the served model's tokenizer
        draft = load_draft_model(DraftModelConfig(args.draft_model, args.draft_format), model)
    rows: list[dict[str, object]] = []
    for profile in profiles:
        methods = ALL_METHODS if (profile.name == PROFILES[0].name and not args.few_methods) else FEW_METHODS
        if args.quick:
            methods = ["baseline", "continuous_batching", "prefix_caching", "spec_ngram"]
        if args.methods:
            methods = args.methods.split(",")
        servers = ServerProcs(model, profile, splits, tuple(args.server_arg))
        chain = AccelChain(model_name=model.name, head=head,
                           hops=[Hop(a, s, e) for a, (s, e) in zip(servers.addresses, splits, strict=True)],
                           draft_drafter=draft, pipeline_groups=args.cb_groups,
                           batched_steps=not args.per_session_steps)
        try:
            warm = Workload(1, 32, 0.0, 4)
            await run_cell(chain, source.prompts(warm, 2), warm, "baseline", args)  # warm-up
            for w in grid:
                # the same prompts for every method of a workload, so methods are compared on equal text;
                # methods that fill prefix caches get fresh text, so none reuses another method's prompts
                shared_text = source.prompts(w, w.concurrency + 1)
                for method in methods:
                    if method == "spec_draft" and draft is None:
                        continue  # without a draft model it would measure prompt lookup under another name
                    fresh = METHODS[method].prefix_caching
                    prompts = source.prompts(w, w.concurrency + 1) if fresh else shared_text
                    result = await run_cell(chain, prompts, w, method, args)
                    row = make_row(profile, w, method, result)
                    rows.append(row)
                    write_partial(rows, args.out)
                    if args.verbose:
                        print_table([row])
            print(f"# profile {profile.name} done at {time.perf_counter() - args.started:.0f} s, "
                  f"loadavg {os.getloadavg()[0]:.2f}", flush=True)
        finally:
            await chain.close()
            servers.stop()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few cells on one profile (minutes)")
    parser.add_argument("--per-session-steps", action="store_true",
                        help="continuous batching without batched messages (one Inference stream per session: "
                             "the scheduling before InferenceBatch, for comparison)")
    parser.add_argument("--cb-groups", type=int, default=0,
                        help="continuous batching: groups the driver splits its sessions into (0 = one per hop)")
    parser.add_argument("--model", type=Path, default=ROOT / ".cache" / "models" / "small")
    parser.add_argument("--out", type=Path, default=None,
                        help="where the dataset and plot go (default .cache/bench/methods; focused runs, i.e. "
                             "--workloads or --methods, default to .cache/bench/methods/focused so they never "
                             "overwrite a full run's dataset)")
    parser.add_argument("--plot", type=Path, default=None, help="PNG path (default: OUT/methods_throughput.png)")
    parser.add_argument("--window-s", type=float, default=3.0,
                        help="decode window per cell, after every request has its first token")
    parser.add_argument("--safety-s", type=float, default=300.0,
                        help="guard against a hang in the prefill phase (cells hitting it are marked capped)")
    parser.add_argument("--profiles", type=int, default=3, help="how many emulated hardware profiles (full run)")
    parser.add_argument("--few-methods", action="store_true", help="4 methods on every profile")
    parser.add_argument("--verbose", action="store_true", help="print each cell as it finishes")
    parser.add_argument("--workloads", default="", help="comma-separated workload names to keep (focused runs)")
    parser.add_argument("--methods", default="", help="comma-separated methods for every profile (focused runs)")
    parser.add_argument("--server-arg", action="append", default=[],
                        help="extra argument for every block server, e.g. --server-arg=--gap-ms=20 (experiments)")
    parser.add_argument("--profile-names", default="", help="comma-separated profiles to run instead of the first N")
    parser.add_argument("--merge", type=Path, default=None,
                        help="CSV of cells measured by an earlier run (other profiles) to include in the dataset")
    parser.add_argument("--draft-model", type=Path, default=None,
                        help="draft model directory for spec_draft (e.g. the draft preset); without it spec_draft "
                             "cells are skipped")
    parser.add_argument("--draft-format", default="fp32", choices=("fp32", "bf16", "int8"),
                        help="weight format the driver loads the draft model in")
    args = parser.parse_args(argv)
    unknown = [m for m in args.methods.split(",") if m and m not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
    names = {p.name for p in [*PROFILES, *EXTRA_PROFILES]}
    if args.profile_names and not set(args.profile_names.split(",")) <= names:
        parser.error(f"--profile-names must be among {sorted(names)}")
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)  # the driver only embeds and applies the LM head; leave the cores to the servers
    if not (args.model / "config.json").exists():
        print(f"model {args.model} missing; build it: .venv/bin/dinet-node make-model {args.model} --preset small",
              file=sys.stderr)
        return 2
    if args.out is None:
        args.out = ROOT / ".cache" / "bench" / "methods"
        if args.workloads or args.methods:
            args.out = args.out / "focused"
    started = args.started = time.perf_counter()
    print(f"# methods benchmark, loadavg {os.getloadavg()[0]:.2f}", flush=True)
    rows = asyncio.run(bench(args))
    import pandas as pd

    if args.merge is not None:  # cells of other profiles from an earlier run of the same grid
        earlier = pd.read_csv(args.merge).to_dict("records")
        rows = [*[{str(k): v for k, v in r.items()} for r in earlier], *rows]

    args.out.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(rows)
    frame.to_csv(args.out / "methods_dataset.csv", index=False)
    frame.to_parquet(args.out / "methods_dataset.parquet", index=False)
    plot = args.plot or args.out / "methods_throughput.png"
    write_plot(rows, plot, PROFILES[0].name)
    print_table(rows)
    p0 = PROFILES[0].name
    quick = args.quick
    cb_task = "txt-c16-p32-s0-o128"
    summary = {
        "cb_speedup_c16": ratio(rows, p0, cb_task, "continuous_batching", "baseline", "performance"),
        "prefix_ttft_speedup": ratio(rows, p0, "txt-c1-p512-s90-o16", "prefix_caching", "baseline", "ttft_s",
                                     invert=True),
        "spec_speedup": ratio(rows, p0, "rep-c1-p64-s0-o64" if quick else "rep-c1-p64-s0-o128", "spec_ngram",
                              "baseline", "performance"),
        "spec_draft_speedup": ratio(rows, p0, "rep-c1-p64-s0-o64" if quick else "rep-c1-p64-s0-o128", "spec_draft",
                                    "baseline", "performance"),
        "cb_decode_speedup_c16": ratio(rows, p0, cb_task, "continuous_batching", "baseline", "decode_tps"),
        "rows": len(rows),
        "profiles": len({r["hardware"] for r in rows}),
        "capped_cells": sum(1 for r in rows if r["capped"]),
        "projected_cells": sum(1 for r in rows if not r["complete"]),
        "loadavg_end": round(os.getloadavg()[0], 2),
        "dataset": str(args.out / "methods_dataset.parquet"),
        "plot": str(plot),
        "wall_s": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
