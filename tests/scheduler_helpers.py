"""Shared builders for the scheduler tests (small synthetic data, candidates, telemetry reports)."""

from __future__ import annotations

import itertools

from proto import common_pb2, messages_pb2
from proto.methods import METHODS
from proto.records import HardwareInfo
from scheduler.interface import GroupCandidate
from scheduler.predictor import PredictorConfig
from scheduler.synthetic import make_hardware

FAST = PredictorConfig(use_text=False, ensemble=2, rounds=40)
_ids = itertools.count()


def candidates(n: int = 4, methods: tuple[str, ...] = tuple(METHODS)) -> list[GroupCandidate]:
    return [GroupCandidate(group=name, hardware=hw, nodes=(f"{name}-n1",), methods=methods)
            for name, hw in make_hardware(n)]


def profile(hw: HardwareInfo) -> common_pb2.HardwareProfile:
    return common_pb2.HardwareProfile(
        cpu_cores=hw.cpu_cores, ram_gb=hw.ram_gb, accelerator=hw.accelerator, gflops=hw.gflops,
        mem_bandwidth_gbs=hw.mem_bandwidth_gbs, net_rtt_ms=hw.net_rtt_ms, weight_format=hw.weight_format,
        threads=hw.threads, price_per_hour=hw.price_per_hour, description=hw.description,
    )


def report(
    *, group: str, hw: HardwareInfo, method: str, tokens_per_s: float, prompt_tokens: int = 100,
    max_new_tokens: int = 256, concurrency: int = 1, text: str = "", ok: bool = True, request_id: str | None = None,
) -> messages_pb2.TimingReport:
    new_tokens = max_new_tokens
    return messages_pb2.TimingReport(
        request_id=request_id or f"req-{next(_ids)}",
        node_id=f"{group}-n1",
        group=group,
        model="tiny",
        method=method,
        ok=ok,
        timing=messages_pb2.Timing(
            prompt_tokens=prompt_tokens, new_tokens=new_tokens, ttft_s=0.05,
            total_s=0.05 + new_tokens / max(tokens_per_s, 1e-3), tokens_per_s=tokens_per_s, queue_s=0.01,
        ),
        max_new_tokens=max_new_tokens,
        shared_prefix_ratio=0.0,
        concurrency_at_arrival=concurrency,
        task_text=text,
        hardware=profile(hw),
        finished_at=1.0,
    )
