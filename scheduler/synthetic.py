"""A synthetic meta-training set with a planted structure (for tests, demos and benchmarks).

Each task is a workload (prompt length, output length, concurrency, shared-prefix
ratio, repetitiveness of the text); each hardware is a CPU or GPU profile. The
noiseless throughput of a method on a (task, hardware) cell is a base speed of the
hardware (memory bandwidth, with prefill eating into it for long prompts) times a
method multiplier, which is where the structure is planted:

- dynamic batching: gains with concurrency; best on CPUs for short outputs;
- continuous batching: gains more with concurrency and output length, most on GPUs;
- prefix caching: gains with the shared-prefix ratio times prompt length;
- chunked prefill: gains with prompt length, mostly on CPUs (memory-bound prefill);
- prompt-lookup speculation (spec_ngram): gains with text repetitiveness on long
  outputs, fading with concurrency;
- draft-model speculation (spec_draft): gains on GPUs for long outputs at low
  concurrency, a loss on CPUs;
- "all": a damped product of the gains it combines, minus an overhead;
- baseline: 1.

So which method wins depends on prompt length, concurrency and hardware (and
repetition). Cells whose two best methods are within ``min_margin`` of each
other are left out (an ambiguous winner cannot be "planted"); the
``planted_best`` and ``planted_margin`` columns record the noiseless winner.
Measurements carry log-normal noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from proto.methods import METHODS
from proto.records import HardwareInfo
from scheduler.embeddings import hardware_features, method_text

CANONICAL_HARDWARE = (
    ("cpu-2c", HardwareInfo(cpu_cores=2, ram_gb=8, gflops=60, mem_bandwidth_gbs=18, threads=2, price_per_hour=0.05,
                            description="small cloud VM: 2 x86 cores, 8 GB RAM, fp32 weights, no accelerator")),
    ("cpu-32c", HardwareInfo(cpu_cores=32, ram_gb=128, gflops=900, mem_bandwidth_gbs=90, threads=32,
                             price_per_hour=0.9, weight_format="bf16",
                             description="large server: 32 cores, 128 GB RAM, bf16 weights, CPU only")),
    ("gpu-t4", HardwareInfo(cpu_cores=8, ram_gb=32, accelerator="cuda:Tesla T4", gflops=8000,
                            mem_bandwidth_gbs=300, threads=8, price_per_hour=0.6, weight_format="bf16",
                            description="NVIDIA T4 GPU with 16 GB memory on an 8-core host")),
    ("gpu-a100", HardwareInfo(cpu_cores=16, ram_gb=128, accelerator="cuda:A100", gflops=150000,
                              mem_bandwidth_gbs=1600, threads=16, price_per_hour=3.0, weight_format="bf16",
                              description="NVIDIA A100 80 GB datacenter GPU")),
)

_HIGH_REP = ("Complete the JSON records", "Refactor this repetitive Python class", "Fill in the CSV table rows",
             "Continue the log file", "Generate unit tests following the pattern", "Extend the YAML config")
_LOW_REP = ("Write a short story about", "Summarize the essay on", "Translate into French a letter about",
            "Explain to a child", "Draft an email about", "Answer the question about")
_TOPICS = ("the harbour", "quantum dots", "a lost key", "tax forms", "mountain weather", "the old library",
           "rust lifetimes", "bird migration", "supply chains", "a jazz concert", "solar panels", "chess openings")


@dataclass(frozen=True)
class SynthTask:
    name: str
    prompt_tokens: int
    max_new_tokens: int
    concurrency: int
    shared_prefix_ratio: float
    repetition: float
    text: str


def _random_hardware(i: int, rng: np.random.Generator) -> tuple[str, HardwareInfo]:
    if rng.random() < 0.5:
        cores = int(rng.choice([2, 4, 8, 16, 32, 64]))
        bw = float(np.clip(cores * rng.uniform(2.5, 6.0), 8, 200))
        return f"cpu-{cores}c-{i}", HardwareInfo(
            cpu_cores=cores, ram_gb=cores * 4.0, gflops=cores * rng.uniform(20, 35), mem_bandwidth_gbs=bw,
            threads=cores, price_per_hour=round(0.025 * cores, 3), description=f"{cores}-core CPU server, fp32",
        )
    bw = float(rng.uniform(250, 3000))
    return f"gpu-{i}", HardwareInfo(
        cpu_cores=8, ram_gb=64, accelerator="cuda:synthetic", gflops=bw * 90, mem_bandwidth_gbs=bw, threads=8,
        price_per_hour=round(0.002 * bw, 3), weight_format="bf16", description=f"GPU with {bw:.0f} GB/s memory",
    )


def make_hardware(n: int, seed: int = 0) -> list[tuple[str, HardwareInfo]]:
    """The four canonical profiles first, then random CPU/GPU profiles."""
    rng = np.random.default_rng(seed + 7919)
    out = list(CANONICAL_HARDWARE[: max(0, n)])
    while len(out) < n:
        out.append(_random_hardware(len(out), rng))
    return out


def make_tasks(n: int, seed: int = 0, *, discrete: bool = True) -> list[SynthTask]:
    """``n`` random workloads. ``discrete``: features drawn from a few levels each (held-out tasks are new
    combinations of levels seen in training); otherwise continuous prompt length and repetition."""
    rng = np.random.default_rng(seed)
    tasks = []
    for i in range(n):
        if discrete:
            rep = float(rng.choice([0.0, 0.2, 0.4, 0.6]))
            prompt = int(rng.choice([32, 128, 512, 1024, 2048, 4096]))
            shared = float(rng.choice([0.0, 0.0, 0.0, 0.6, 0.9]))
        else:
            rep = round(float(rng.uniform(0.0, 0.7)), 3)
            prompt = int(math.exp(rng.uniform(math.log(16), math.log(4096))))
            shared = 0.0 if rng.random() < 0.6 else round(float(rng.uniform(0.5, 0.95)), 3)
        opener = (_HIGH_REP if rep > 0.3 else _LOW_REP)[int(rng.integers(6))]
        tasks.append(
            SynthTask(
                name=f"task-{i:03d}",
                prompt_tokens=prompt,
                max_new_tokens=int(rng.choice([16, 32, 64, 128, 256, 512])),
                concurrency=int(rng.choice([1, 1, 1, 1, 2, 4, 8, 16, 32])),
                shared_prefix_ratio=shared,
                repetition=rep,
                text=f"{opener} {_TOPICS[int(rng.integers(len(_TOPICS)))]}",
            )
        )
    return tasks


def multipliers(task: SynthTask, hw: HardwareInfo) -> dict[str, float]:
    """The planted structure: noiseless speed-up of each method over baseline."""
    gpu = hw.accelerator != "cpu"
    conc = max(1, task.concurrency)
    lc = math.log2(conc)
    long_out = task.max_new_tokens >= 128
    m: dict[str, float] = {"baseline": 1.0}
    if gpu:
        m["dynamic_batching"] = 1 + 0.4 * lc if conc >= 2 else 0.9
        m["continuous_batching"] = 1 + 0.6 * lc if conc >= 2 else 0.95
    else:
        short = task.max_new_tokens <= 64
        m["dynamic_batching"] = (1 + (0.45 if short else 0.2) * lc) if conc >= 2 else 0.9
        m["continuous_batching"] = (1 + (0.2 if short else 0.45) * lc) if conc >= 2 else 0.95
    reach = min(1.0, task.prompt_tokens / 512)
    m["prefix_caching"] = 1 + 2.5 * task.shared_prefix_ratio * reach if task.shared_prefix_ratio > 0 else 0.97
    over = math.log2(max(task.prompt_tokens / 512, 1.0))
    m["chunked_prefill"] = 1 + (0.9 if not gpu else 0.15) * over if task.prompt_tokens >= 1024 else 0.95
    m["spec_ngram"] = (1 + 2.2 * task.repetition) / (1 + 0.5 * lc) if long_out else 0.92
    if gpu and long_out:
        m["spec_draft"] = (1.6 + 0.4 * (1 - task.repetition)) / (1 + 0.5 * lc)
    else:
        m["spec_draft"] = 0.75
    gains = [m["continuous_batching"], m["prefix_caching"], m["chunked_prefill"], m["spec_ngram"]]
    m["all"] = 0.8 * math.prod(1 + 0.6 * (g - 1) for g in gains if g > 1)
    return m


def base_speed(task: SynthTask, hw: HardwareInfo) -> float:
    """Baseline tokens/s: memory bandwidth bound decode, slowed by prefill of long prompts."""
    gpu = hw.accelerator != "cpu"
    decode = 40 + 0.08 * hw.mem_bandwidth_gbs if gpu else 1.3 * hw.mem_bandwidth_gbs
    prefill_cost = 0.002 if gpu else 0.02
    return decode * task.max_new_tokens / (task.max_new_tokens + prefill_cost * task.prompt_tokens)


def generate(
    tasks: int = 60,
    hardware: int = 4,
    reps: int = 2,
    noise: float = 0.04,
    seed: int = 0,
    min_margin: float = 0.1,
    missing: float = 0.0,
    methods: tuple[str, ...] | None = None,
    discrete: bool = True,
) -> pd.DataFrame:
    """The long table (see :mod:`scheduler.dataset`), ``reps`` noisy measurements per (task, method, hardware).

    ``missing``: share of non-winning (cell, method) entries left unmeasured.
    """
    rng = np.random.default_rng(seed + 1)
    names = tuple(methods or METHODS)
    rows = []
    for task in make_tasks(tasks, seed, discrete=discrete):
        for hw_name, hw in make_hardware(hardware, seed):
            mult = multipliers(task, hw)
            ranked = sorted(names, key=lambda k: -mult[k])
            margin = mult[ranked[0]] / mult[ranked[1]] - 1 if len(ranked) > 1 else math.inf
            if margin < min_margin:
                continue
            base = base_speed(task, hw)
            prefill_rate = (20.0 if hw.accelerator == "cpu" else 2.0) * hw.gflops
            for method in names:
                if method != ranked[0] and rng.random() < missing:
                    continue
                for _ in range(reps):
                    perf = base * mult[method] * math.exp(rng.normal(0, noise))
                    row = {
                        "task": task.name,
                        "method": method,
                        "hardware": hw_name,
                        "performance": perf,
                        "runtime_s": task.max_new_tokens / perf + task.prompt_tokens / prefill_rate,
                        "cost_per_hour": hw.price_per_hour,
                        "task_text": task.text,
                        "method_text": method_text(method),
                        "hardware_text": hw.description,
                        "task.prompt_tokens": float(task.prompt_tokens),
                        "task.max_new_tokens": float(task.max_new_tokens),
                        "task.shared_prefix_ratio": task.shared_prefix_ratio,
                        "task.concurrency": float(task.concurrency),
                        "task.repetition": task.repetition,
                        **METHODS[method].features(),
                        **hardware_features(hw),
                        "planted_best": ranked[0],
                        "planted_margin": margin,
                    }
                    rows.append(row)
    return pd.DataFrame(rows)
