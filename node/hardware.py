"""Measures the node's hardware profile at start-up (part of the scheduler's hardware embedding).

Numbers are measured, not declared, except the price, which is the operator's to set.
The measurement takes well under a second so a node can do it on every start.
"""

from __future__ import annotations

import os
import platform
import time

import torch

from proto.records import HardwareInfo


def _ram_gb() -> float:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 1024**2
    except OSError:
        pass
    return 0.0


def measure_gflops(size: int = 384, repeats: int = 6) -> float:
    """fp32 matmul throughput with the current torch thread count."""
    a = torch.randn(size, size)
    b = torch.randn(size, size)
    torch.matmul(a, b)  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        torch.matmul(a, b)
    elapsed = max(time.perf_counter() - start, 1e-9)
    return 2 * size**3 * repeats / elapsed / 1e9


def measure_mem_bandwidth_gbs(megabytes: int = 64, repeats: int = 4) -> float:
    """Copy bandwidth (read + write) of a buffer larger than typical caches."""
    src = torch.empty(megabytes * 1024 * 1024 // 4, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    start = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    elapsed = max(time.perf_counter() - start, 1e-9)
    return 2 * src.numel() * 4 * repeats / elapsed / 1e9


def measure_hardware(*, weight_format: str = "fp32", price_per_hour: float = 0.0) -> HardwareInfo:
    """Profile this process's compute as configured (torch threads, device)."""
    threads = torch.get_num_threads()
    cores = os.cpu_count() or 1
    accelerator = f"cuda:{torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "cpu"
    gflops = measure_gflops()
    bandwidth = measure_mem_bandwidth_gbs()
    description = (
        f"{platform.processor() or platform.machine()} {cores}-core host, {threads} torch threads, "
        f"{_ram_gb():.0f} GB RAM, {accelerator}, {weight_format} weights, "
        f"{gflops:.0f} GFLOP/s, {bandwidth:.1f} GB/s memory"
    )
    return HardwareInfo(
        cpu_cores=cores,
        ram_gb=round(_ram_gb(), 2),
        accelerator=accelerator,
        gflops=round(gflops, 2),
        mem_bandwidth_gbs=round(bandwidth, 2),
        weight_format=weight_format,
        threads=threads,
        price_per_hour=price_per_hour,
        description=description[:250],
    )
