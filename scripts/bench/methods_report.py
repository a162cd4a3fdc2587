"""Tables, plot and summary ratios of the methods benchmark's cells (rows in the scheduler's dataset format)."""

from __future__ import annotations

from pathlib import Path


def write_partial(rows: list[dict[str, object]], out: Path) -> None:
    """Rows so far, under a name no reader waits for (the final dataset is written once, at the end)."""
    import pandas as pd

    out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(out / "methods_dataset.partial.csv", index=False)


def print_table(rows: list[dict[str, object]]) -> None:
    print("| hardware | workload | method | tok/s | decode tok/s | TTFT s | p99 s | measured |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        how = "CAPPED" if r["capped"] else ("complete" if r["complete"] else "projected")
        print(f"| {r['hardware']} | {r['task']} | {r['method']} | {float(r['performance']):.1f} "  # type: ignore[arg-type]
              f"| {float(r['decode_tps']):.1f} | {float(r['ttft_s']):.3f} "  # type: ignore[arg-type]
              f"| {float(r['p99_latency_s']):.2f} | {how} |", flush=True)  # type: ignore[arg-type]


def write_plot(rows: list[dict[str, object]], path: Path, profile: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mine = [r for r in rows if r["hardware"] == profile]
    tasks = list(dict.fromkeys(str(r["task"]) for r in mine))
    methods = list(dict.fromkeys(str(r["method"]) for r in mine))
    fig, ax = plt.subplots(figsize=(max(8, len(tasks) * 0.6), 5))
    width = 0.8 / max(1, len(methods))
    for j, method in enumerate(methods):
        values = {str(r["task"]): float(r["performance"]) for r in mine if r["method"] == method}  # type: ignore[arg-type]
        ax.bar([i + j * width for i in range(len(tasks))], [values.get(t, 0.0) for t in tasks], width, label=method)
    ax.set_xticks([i + 0.4 for i in range(len(tasks))])
    ax.set_xticklabels(tasks, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("tokens / s (all requests)")
    ax.set_yscale("log")
    ax.set_title(f"dinet acceleration methods, small model, 2-node chain, profile {profile}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def ratio(rows: list[dict[str, object]], profile: str, task: str, num: str, den: str, key: str,
          invert: bool = False) -> float | None:
    def get(method: str) -> float | None:
        for r in rows:
            if r["hardware"] == profile and r["task"] == task and r["method"] == method:
                return float(r[key])  # type: ignore[arg-type]
        return None

    a, b = get(num), get(den)
    if a is None or b is None or min(a, b) <= 0:
        return None
    return round(b / a if invert else a / b, 3)
