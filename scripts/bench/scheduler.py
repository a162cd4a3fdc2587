"""Selection latency of the MetaInf scheduler: one request scored over 8 methods x 4 consumer groups.

Trains a model on a synthetic dataset (or loads ``--model DIR``), then times
``MetaInfPolicy.select`` on ``--requests`` random requests (task texts drawn from a
pool, so both LM-embedding cache hits and misses occur), after a warm-up. For
comparison it also times the expert rules, the compiled numpy forest alone, and
XGBoost's own ``inplace_predict`` on the same 32-row batches (the path the compiled
forest replaces).

Prints a table, and as its last line a JSON object with ``selection_p50_ms``,
``selection_p99_ms``, ``pairs`` and the comparison figures.

Usage: ``.venv/bin/python scripts/bench/scheduler.py [--no-text] [--requests N] [--model DIR]``
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from proto.methods import METHODS  # noqa: E402
from scheduler.binned import BinnedForest, PairScorer  # noqa: E402
from scheduler.interface import GroupCandidate, RequestFeatures  # noqa: E402
from scheduler.predictor import MetaPredictor, PredictorConfig  # noqa: E402
from scheduler.selection import ExpertRulesPolicy, MetaInfPolicy, SelectionConfig  # noqa: E402
from scheduler.synthetic import generate, make_hardware  # noqa: E402
from scheduler.training import train_predictor  # noqa: E402

TEXTS = [
    "Complete the JSON records for the inventory",
    "Write a short story about the harbour at night",
    "Refactor this repetitive Python class",
    "Summarize the essay on supply chains",
    "Translate into French a letter about tax forms",
    "Fill in the CSV table rows of sensor readings",
]


def percentiles(samples: list[float]) -> dict[str, float]:
    ms = np.asarray(samples) * 1e3
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p90_ms": float(np.percentile(ms, 90)),
        "p99_ms": float(np.percentile(ms, 99)),
        "max_ms": float(ms.max()),
        "mean_ms": float(ms.mean()),
    }


def timed(fn: Callable[[int], object], n: int, warmup: int) -> dict[str, float]:
    for i in range(warmup):
        fn(i)
    samples = []
    for i in range(n):
        t0 = time.perf_counter()
        fn(i)
        samples.append(time.perf_counter() - t0)
    return percentiles(samples)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="benchmark this model directory instead of training one")
    parser.add_argument("--no-text", action="store_true", help="train without the LM text embeddings")
    parser.add_argument("--tasks", type=int, default=100, help="synthetic tasks to train on (default 100)")
    parser.add_argument("--requests", type=int, default=5000, help="timed selections (default 5000)")
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--epsilon", type=float, default=0.05, help="exploration rate (default 0.05)")
    args = parser.parse_args()

    started = time.monotonic()
    if args.model:
        predictor = MetaPredictor.load(args.model)
    else:
        df = generate(tasks=args.tasks, reps=1, seed=0)
        predictor = train_predictor(df, PredictorConfig(use_text=not args.no_text))
    train_s = time.monotonic() - started

    groups = [GroupCandidate(group=name, hardware=hw, nodes=(f"{name}-a", f"{name}-b"),
                             reputations={f"{name}-a": 0.9, f"{name}-b": 1.0}, methods=tuple(METHODS))
              for name, hw in make_hardware(4)]
    pairs = sum(len(g.methods) for g in groups)
    rng = np.random.default_rng(1)
    requests = [
        RequestFeatures(
            model="small",
            prompt_tokens=int(rng.integers(8, 4096)),
            max_new_tokens=int(rng.choice([16, 64, 128, 256, 512])),
            shared_prefix_ratio=float(rng.choice([0.0, 0.0, 0.5, 0.9])),
            concurrency=int(rng.integers(0, 33)),
            priority=str(rng.choice(["high", "normal", "batch"])),
            task_text=f"{TEXTS[int(rng.integers(len(TEXTS)))]} #{int(rng.integers(20))}",
        )
        for _ in range(1000)
    ]
    policy = MetaInfPolicy(predictor, SelectionConfig(epsilon=args.epsilon), seed=0)
    if policy.text_cache is not None:  # start the encoder; embed the group descriptions up front
        policy.text_cache.warm([g.hardware.description for g in groups])
    expert = ExpertRulesPolicy()

    def select(i: int) -> object:
        return policy.select(requests[i % len(requests)], groups)

    def rules(i: int) -> object:
        return expert.select(requests[i % len(requests)], groups)

    def window(i: int) -> object:  # 16 requests routed together, as the broker does per event-loop turn
        return policy.select_many([(requests[(16 * i + j) % len(requests)], groups) for j in range(16)])

    gc.collect()
    metainf = timed(select, args.requests, args.warmup)
    experts = timed(rules, args.requests, args.warmup)
    windows = timed(window, max(1, args.requests // 16), max(1, args.warmup // 16))

    # the prediction step alone: compiled forest vs XGBoost inplace_predict on the same batch
    x = predictor.space.transform(generate(tasks=4, reps=1, seed=9).head(pairs))
    forest = timed(lambda i: predictor.predict_matrix(x), 2000, 100)
    # the selection path's predictor on a memo miss: leaf masks for 32 pairs, the task part varying
    space = predictor.space
    binned = BinnedForest(predictor.forest)
    block = np.stack([np.concatenate([space.method_vector(m), space.hardware_vector(g.group, g.hardware, None)])
                      for g in groups for m in g.methods]).astype(np.float32)
    scorer = PairScorer(binned, space.n_task, block, block[:, space.flag_index], memo_size=0)
    tasks = x[:, : space.n_task].copy()
    cross = space.cross_task_values(tasks)
    leaf = timed(lambda i: scorer.predict(tasks[i % len(tasks) : i % len(tasks) + 1],
                                          cross[i % len(tasks) : i % len(tasks) + 1]), 2000, 100)
    xgb = timed(lambda i: predictor.predict_matrix_xgb(x), 2000, 100)

    hits = policy.text_cache.encoder.encoded if policy.text_cache is not None else 0
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus; "
          f"model {predictor.version} ({predictor.forest.n_trees} trees, depth {predictor.forest.depth}, "
          f"{len(predictor.feature_names)} features, text={predictor.space.uses_text}); "
          f"ready in {train_s:.1f}s")
    print(f"{'step':<34} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for label, r in (
        (f"MetaInf select ({pairs} pairs)", metainf),
        ("MetaInf select_many, 16 requests", windows),
        ("expert rules select", experts),
        ("leaf-mask predict, memo miss", leaf),
        ("compiled forest predict", forest),
        ("xgboost inplace_predict", xgb),
    ):
        print(f"{label:<34} {r['p50_ms']:>8.3f} {r['p90_ms']:>8.3f} {r['p99_ms']:>8.3f} {r['max_ms']:>8.3f}")
    print(f"explorations: {policy.explorations}/{policy.decisions}; texts embedded in the background: {hits}")
    print(json.dumps({
        "pairs": pairs,
        "selection_p50_ms": round(metainf["p50_ms"], 4),
        "selection_p99_ms": round(metainf["p99_ms"], 4),
        "selection_max_ms": round(metainf["max_ms"], 4),
        "window16_p50_ms": round(windows["p50_ms"], 4),
        "window16_p99_ms": round(windows["p99_ms"], 4),
        "leafmask_miss_p50_ms": round(leaf["p50_ms"], 4),
        "memo_hit_rate": round(policy.serving_stats()["prediction_memo_hits"] / max(1, policy.decisions), 3),
        "expert_p99_ms": round(experts["p99_ms"], 4),
        "forest_predict_p99_ms": round(forest["p99_ms"], 4),
        "xgboost_predict_p99_ms": round(xgb["p99_ms"], 4),
        "trees": predictor.forest.n_trees,
        "text": predictor.space.uses_text,
        "model_version": predictor.version,
        "cpus": os.cpu_count(),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
