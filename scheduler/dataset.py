"""The meta-training set: a long table, one row per measured (task, method, hardware) cell.

Columns (see docs/scheduler.md for the full description):

========================  ========  ==============================================================
column                    required  meaning
========================  ========  ==============================================================
``task``                  yes       workload identifier (rows of one task share its conditions)
``method``                yes       acceleration method name (``proto.methods.METHODS`` or any)
``hardware``              yes       hardware / consumer-group identifier
``performance``           yes       higher is better; tokens/s for dinet's own data (> 0)
``runtime_s``             no        measured wall time of the request (cost model), seconds
``task_text``             no        free text of the task (prompt prefix or description)
``method_text``           no        free text describing the method
``hardware_text``         no        free text describing the hardware
``task.*``                no        numeric request meta-features (``task.prompt_tokens``, ...)
``method.*``              no        numeric method features (flags and parameters)
``hw.*``                  no        numeric hardware features (measured profile)
``cost_per_hour``         no        price of the hardware per hour (budget units)
``capped``                no        true when the run was cut off, so performance is a lower bound
========================  ========  ==============================================================

Missing cells are allowed: not every method needs to be measured on every
(task, hardware) pair, and any optional value may be empty. Other columns are
kept but ignored by training.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from proto import common_pb2, messages_pb2
from proto.records import HardwareInfo
from scheduler.embeddings import hardware_features, method_features, repetition_score

REQUIRED = ("task", "method", "hardware", "performance")
TEXT_COLUMNS = ("task_text", "method_text", "hardware_text")
PREFIXES = ("task.", "method.", "hw.")
OPTIONAL_NUMERIC = ("runtime_s", "cost_per_hour")
SUFFIXES = (".csv", ".parquet", ".pq", ".csv.gz")
# other spellings accepted for the canonical task features the broker fills at selection time
ALIASES = {
    "task.shared_prefix": "task.shared_prefix_ratio",
    "task.repetitive": "task.repetition",
    "task.prompt_len": "task.prompt_tokens",
    "task.max_tokens": "task.max_new_tokens",
    "hw.delay_ms": "hw.net_rtt_ms",  # the methods benchmark's emulated per-hop delay is a network delay
}


class DatasetError(ValueError):
    """A dataset file or frame is not in the documented format (the message says what to fix)."""


def feature_columns(df: pd.DataFrame, prefix: str | None = None) -> list[str]:
    """Numeric meta-feature columns (``task.*``, ``method.*``, ``hw.*``), in table order."""
    prefixes = (prefix,) if prefix else PREFIXES
    return [c for c in df.columns if isinstance(c, str) and c.startswith(prefixes)]


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return path.suffix.lower()


def read_dataset(path: str | Path) -> pd.DataFrame:
    """Read a CSV or parquet dataset and validate it (:func:`validate_frame`).

    :raises DatasetError: missing file, unknown format, unreadable file or missing columns.
    """
    p = Path(path)
    if not p.exists():
        raise DatasetError(f"dataset file {p} does not exist")
    if p.is_dir():
        raise DatasetError(f"dataset path {p} is a directory; pass a .csv or .parquet file")
    suffix = _suffix(p)
    try:
        if suffix in (".parquet", ".pq"):
            df = pd.read_parquet(p)
        elif suffix in (".csv", ".csv.gz"):
            df = pd.read_csv(p, low_memory=False)
        else:
            raise DatasetError(f"unknown dataset format {p.name!r}: use a .csv or .parquet file")
    except DatasetError:
        raise
    except Exception as exc:
        raise DatasetError(f"cannot read dataset {p}: {exc}") from exc
    return validate_frame(df, source=str(p))


def validate_frame(df: pd.DataFrame, *, source: str = "dataset") -> pd.DataFrame:
    """Check the documented columns and clean the values; returns a new frame.

    - required columns must exist (the error lists what was found);
    - ``task``/``method``/``hardware`` become strings; rows where one is empty are dropped;
    - prefixed and optional numeric columns are coerced to float (non-numbers become NaN;
      a prefixed column with no number at all is an error naming it);
    - rows whose performance is missing, not finite or not positive are dropped.

    ``df.attrs["dropped_rows"]`` says how many rows were dropped.
    """
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        found = ", ".join(map(str, df.columns[:20])) + (" ..." if len(df.columns) > 20 else "")
        raise DatasetError(
            f"{source}: missing required column(s) {', '.join(missing)}; found: {found or '(none)'}. "
            "A dataset needs task, method, hardware and performance (see docs/scheduler.md)"
        )
    out = df.copy()
    renames = {a: c for a, c in ALIASES.items() if a in out.columns and c not in out.columns}
    if renames:
        out = out.rename(columns=renames)
    n0 = len(out)
    for col in ("task", "method", "hardware"):
        out[col] = out[col].astype("string").str.strip()
    for col in TEXT_COLUMNS:
        if col in out.columns:
            out[col] = out[col].astype("string").fillna("")
    if "capped" not in out.columns and "censored" in out.columns:
        out = out.rename(columns={"censored": "capped"})
    if "capped" in out.columns:
        out["capped"] = out["capped"].map(_truthy).astype(bool)
    numeric = ["performance", *[c for c in OPTIONAL_NUMERIC if c in out.columns], *feature_columns(out)]
    for col in numeric:
        out[col] = pd.to_numeric(out[col], errors="coerce").astype(float)
        out.loc[~np.isfinite(out[col].to_numpy(dtype=float, na_value=np.nan)), col] = np.nan
    # a feature column without a single number carries nothing; drop it (reported in attrs)
    empty = [c for c in feature_columns(out) if out[c].notna().sum() == 0]
    out = out.drop(columns=empty)
    keep = out["task"].notna() & (out["task"] != "") & out["method"].notna() & (out["method"] != "")
    keep &= out["hardware"].notna() & (out["hardware"] != "")
    keep &= out["performance"].notna() & (out["performance"] > 0)
    out = out.loc[keep].reset_index(drop=True)
    for col in ("task", "method", "hardware"):
        out[col] = out[col].astype(str)
    if out.empty:
        raise DatasetError(
            f"{source}: no usable rows ({n0} read); every row needs task, method, hardware and a positive, "
            "finite performance"
        )
    out.attrs["dropped_rows"] = n0 - len(out)
    out.attrs["dropped_columns"] = empty
    return out


def _truthy(v: Any) -> bool:
    if isinstance(v, str):
        return v.strip().lower() in ("1", "true", "yes", "y", "t")
    try:
        return bool(v) and not (isinstance(v, float) and math.isnan(v))
    except (TypeError, ValueError):
        return False


def write_dataset(df: pd.DataFrame, path: str | Path) -> Path:
    """Write ``df`` as parquet or CSV, chosen by the file's suffix."""
    p = Path(path)
    suffix = _suffix(p)
    if suffix not in SUFFIXES:
        raise DatasetError(f"unknown output format {p.name!r}: use a .csv or .parquet file")
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    if suffix in (".parquet", ".pq"):
        frame = df.copy()
        for col in frame.columns:  # parquet needs one type per column
            if frame[col].dtype == object:
                frame[col] = frame[col].astype("string")
        frame.to_parquet(tmp, index=False)
    else:
        df.to_csv(tmp, index=False, compression="gzip" if suffix == ".csv.gz" else None)
    tmp.replace(p)
    return p


def rows_to_frame(rows: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """A frame from row dicts (missing keys become missing cells), required columns first."""
    df = pd.DataFrame.from_records(list(rows))
    first = [c for c in (*REQUIRED, "runtime_s", "cost_per_hour", *TEXT_COLUMNS) if c in df.columns]
    return df[first + [c for c in df.columns if c not in first]]


# ---------------------------------------------------------------- telemetry -> row


def hardware_from_profile(profile: common_pb2.HardwareProfile) -> HardwareInfo:
    return HardwareInfo(
        cpu_cores=max(1, int(profile.cpu_cores)),
        ram_gb=profile.ram_gb,
        accelerator=profile.accelerator or "cpu",
        gflops=profile.gflops,
        mem_bandwidth_gbs=profile.mem_bandwidth_gbs,
        net_rtt_ms=profile.net_rtt_ms,
        weight_format=profile.weight_format or "fp32",
        threads=max(1, int(profile.threads)),
        price_per_hour=profile.price_per_hour,
        description=profile.description,
    )


def _pow2_bucket(x: float) -> int:
    return 0 if x <= 0 else int(2 ** math.ceil(math.log2(x)))


def task_id(model: str, task_text: str, prompt_tokens: int, max_new_tokens: int) -> str:
    """The ``task`` of a telemetry row: the model plus the task text (or, without text, size buckets)."""
    if task_text:
        digest = hashlib.blake2b(task_text.encode(), digest_size=5).hexdigest()
        return f"{model}:{digest}"
    return f"{model}:p{_pow2_bucket(prompt_tokens)}:n{_pow2_bucket(max_new_tokens)}"


def timing_report_to_row(report: messages_pb2.TimingReport | bytes) -> dict[str, Any] | None:
    """One meta-training row from a node's TimingReport; None for a failed or empty run.

    ``performance`` is the measured decode throughput (tokens/s), ``runtime_s`` the
    node-side wall time. ``hardware`` is the consumer group (nodes of a group share
    their hardware class); the node's measured profile fills the ``hw.*`` columns.
    """
    if isinstance(report, bytes | bytearray):
        parsed = messages_pb2.TimingReport()
        parsed.ParseFromString(bytes(report))
        report = parsed
    timing = report.timing
    if not report.ok or timing.tokens_per_s <= 0 or not math.isfinite(timing.tokens_per_s):
        return None
    hw = hardware_from_profile(report.hardware)
    text = report.task_text
    row: dict[str, Any] = {
        "task": task_id(report.model, text, timing.prompt_tokens, report.max_new_tokens),
        "method": report.method or "baseline",
        "hardware": report.group or report.node_id or "unknown",
        "performance": float(timing.tokens_per_s),
        "runtime_s": float(timing.total_s) if timing.total_s > 0 else math.nan,
        "cost_per_hour": hw.price_per_hour,
        "task_text": text,
        "hardware_text": hw.description,
        "task.prompt_tokens": float(timing.prompt_tokens),
        "task.max_new_tokens": float(report.max_new_tokens or timing.new_tokens),
        "task.shared_prefix_ratio": float(report.shared_prefix_ratio),
        "task.concurrency": float(report.concurrency_at_arrival),
        "task.repetition": repetition_score(text) if text else math.nan,
    }
    row.update(method_features(row["method"]))
    row.update(hardware_features(hw))
    row.update(
        {
            "request_id": report.request_id,
            "node_id": report.node_id,
            "model": report.model,
            "new_tokens": int(timing.new_tokens),
            "ttft_s": float(timing.ttft_s),
            "queue_s": float(timing.queue_s),
            "finished_at": float(report.finished_at),
            "decision_scheduler": report.decision.scheduler,
            "decision_model_version": report.decision.model_version,
            "decision_predicted_tokens_per_s": float(report.decision.predicted_tokens_per_s),
            "decision_exploration": bool(report.decision.exploration),
        }
    )
    return row
