"""The machine a measurement ran on, recorded beside it (the bench's run log, the benchmarks' JSON)."""

from __future__ import annotations

import functools
import os
from pathlib import Path


@functools.cache
def native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX): elsewhere torch emulates it, far slower than
    fp32 (docs/PERFORMANCE.md, "bf16 only where the CPU computes it")."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return bool({"avx512_bf16", "amx_bf16"} & flags)


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
