"""Resident memory of a block server: half the blocks vs all blocks of the `small` model.

Each measurement is a fresh child process that imports everything (torch, transformers'
Llama modelling code, hivemind, gRPC) and warms torch up, reads its RSS (the empty-process
baseline: what any node costs before it holds a single weight), then starts a real serving node
(``start_serving``: DHT peer, selective weight load, gRPC server, announcer) and reads its
RSS again. ``ratio`` = (half - its baseline) / (all - its baseline); target <= 0.65.
The last line is a JSON object.

    .venv/bin/python scripts/bench/memory.py [--model .cache/models/small]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def rss_mb(field: str = "VmRSS") -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


async def child(model: str, blocks: str) -> dict[str, float]:
    import gc

    import torch
    import transformers.models.llama.modeling_llama  # noqa: F401 - code (~80 MiB of imports), not weights

    from node.blocks.launch import ServingConfig, start_serving
    from proto.records import HardwareInfo

    torch.randn(256, 256) @ torch.randn(256, 256)  # torch's allocator and thread pool exist in both states
    gc.collect()
    base, base_anon = rss_mb(), rss_mb("RssAnon")
    start, end = (int(x) for x in blocks.split(":"))
    handle = await start_serving(
        ServingConfig(model_path=model, model_name="mem", group="bench", start_block=start, end_block=end),
        HardwareInfo(),
    )
    gc.collect()
    loaded, loaded_anon = rss_mb(), rss_mb("RssAnon")
    await handle.close()
    return {"baseline_mb": base, "serving_mb": loaded, "delta_mb": loaded - base,
            "delta_anon_mb": loaded_anon - base_anon}


def measure(model: Path, blocks: str) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", blocks, "--model", str(model)],
        check=True, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / ".cache" / "models" / "small"))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="accepted for symmetry; the run is already short")
    args = parser.parse_args()
    if args.child:
        sys.path.insert(0, str(ROOT))
        print(json.dumps(asyncio.run(child(args.model, args.child))))
        return 0
    model = Path(args.model)
    if not (model / "config.json").exists():
        print(f"build the model first: dinet-node make-model {model} --preset small", file=sys.stderr)
        return 2
    layers = json.loads((model / "config.json").read_text())["num_hidden_layers"]
    half = measure(model, f"0:{layers // 2}")
    full = measure(model, f"0:{layers}")
    result = {
        "model": model.name,
        "half_blocks": f"0:{layers // 2}",
        "half_delta_mb": round(half["delta_mb"], 1),
        "all_delta_mb": round(full["delta_mb"], 1),
        "ratio": round(half["delta_mb"] / full["delta_mb"], 3),
        "ratio_anon": round(half["delta_anon_mb"] / full["delta_anon_mb"], 3),
        "baseline_mb": round(half["baseline_mb"], 1),
        "half_rss_mb": round(half["serving_mb"], 1),
        "all_rss_mb": round(full["serving_mb"], 1),
    }
    print(f"half-blocks node +{result['half_delta_mb']} MiB, all-blocks node +{result['all_delta_mb']} MiB "
          f"over a {result['baseline_mb']} MiB empty process: ratio {result['ratio']}", file=sys.stderr)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
