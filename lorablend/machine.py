"""The machine a measurement ran on, recorded beside it (the bench's run log, the benchmarks' JSON)."""

from __future__ import annotations

import functools
import os
from pathlib import Path


@functools.cache
def native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX): elsewhere torch emulates it, far slower than
    fp32 (docs/PERFORMANCE.md, "bf16 only where the CPU computes it")."""
    return bf16_kernels() != "none"


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux lists them (empty where /proc/cpuinfo cannot be read)."""
    try:
        return frozenset(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return frozenset()


def bf16_kernels() -> str:
    """Which bf16 kernels this CPU runs: amx, avx512_bf16 or none. Training in bf16 is bit-reproducible only within
    one kind (and one torch): AMX and AVX512-BF16 accumulate in other orders."""
    flags = cpu_flags()
    return "amx" if "amx_bf16" in flags else "avx512_bf16" if "avx512_bf16" in flags else "none"


def available_gib() -> float:
    """Memory a new allocation can have now (MemAvailable), in GiB; inf where the system does not say."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except (OSError, ValueError, IndexError):
        pass
    return float("inf")


def busy_cores(interval: float = 0.3) -> float:
    """Cores kept busy now, from /proc/stat sampled over `interval` while this process waits; else the 1-minute
    load average. The load average lags: right after lorablend's own scoring it still counts that work."""
    import time

    try:
        first = _cpu_times()
        time.sleep(interval)
        return busy_between(first, _cpu_times(), os.cpu_count() or 1)
    except (OSError, ValueError, IndexError):
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0


def _cpu_times() -> list[int]:
    with open("/proc/stat", encoding="ascii") as fh:
        return [int(x) for x in fh.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal


def busy_between(a: list[int], b: list[int], cores: int) -> float:
    """Busy cores between two /proc/stat samples (idle and iowait count as idle)."""
    total = sum(b) - sum(a)
    idle = (b[3] + b[4]) - (a[3] + a[4])
    return cores * (1 - idle / total) if total > 0 else 0.0


def machine() -> dict:
    """nproc, RAM, CPU model, Python and torch versions, and the load average (neighbours skew timings)."""
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        ram = float("nan")
    import torch

    return {"nproc": os.cpu_count(), "ram_gib": round(ram, 1), "cpu": cpu, "python": platform.python_version(),
            "torch": torch.__version__,
            **({"load_avg": [round(x, 2) for x in os.getloadavg()]} if hasattr(os, "getloadavg") else {})}
