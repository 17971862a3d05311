"""The bank's adapters combined with given coefficients, streamed one module at a time."""

from __future__ import annotations

import os
from pathlib import Path

from lorablend.adapter import AdapterReader, check_shapes
from lorablend.bank.manifest import Bank
from lorablend.combine import Factors, combine_factors
from lorablend.errors import InputError


def open_readers(bank: Bank, names: list[str]) -> dict[str, AdapterReader]:
    readers = {n: AdapterReader(bank.adapter_path(bank.entry(n))) for n in names}
    check_compatible(bank, readers)
    return readers


def check_compatible(bank: Bank, readers: dict[str, AdapterReader]) -> None:
    """Refuse what cannot be combined: other base models, differing module sets or shapes."""
    base = bank.manifest.base_model
    first_name, first = next(iter(readers.items()))
    for name, r in readers.items():
        if r.spec.base_model and base and Path(r.spec.base_model).name.lower() != Path(base).name.lower():
            raise InputError(f"entry {name}: adapter is for base model {r.spec.base_model}, the bank is for {base}; remove it")
        if r.modules != first.modules:
            diff = sorted(set(first.modules) ^ set(r.modules))
            raise InputError(
                f"entry {name}: target modules differ from entry {first_name} (e.g. {diff[0]}); "
                "all bank adapters must adapt the same modules"
            )


def combine_modules(readers: dict[str, AdapterReader], coefs: dict[str, float], method: str, rank: int | None,
                    threads: int | None = None):
    """Yield (module, combined Factors) for every module, in order.

    Each module is read from every adapter with a nonzero coefficient, combined, and its
    pages released, so memory holds a few modules of the bank, never the bank. `threads`
    modules (default: the usable cores) are combined at once, each with single-threaded BLAS:
    numpy and LAPACK release the GIL, and multi-threaded BLAS spins at barriers, which made
    an svd combination 6x slower beside one other busy process (docs/PERFORMANCE.md).
    """
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_limits

    names = [n for n, c in coefs.items() if c > 0]
    weights = [coefs[n] for n in names]
    modules = readers[names[0]].modules

    def one(module: str) -> Factors:
        factors = [readers[n].factors(module) for n in names]
        check_shapes(module, [f"entry {n}" for n in names], factors)
        try:
            return combine_factors(method, factors, weights, rank)
        except ValueError as exc:
            raise InputError(f"module {module}: {exc}") from None

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = max(1, threads or cores)
    with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(workers) as pool:
        ahead = [pool.submit(one, m) for m in modules[:workers]]
        for i, module in enumerate(modules):
            out = ahead.pop(0).result()
            if i + workers < len(modules):
                ahead.append(pool.submit(one, modules[i + workers]))
            for n in names:  # in module order, so no page a running worker still reads is dropped
                readers[n].release(module)
            yield module, out


def bank_rank(readers: dict[str, AdapterReader]) -> int:
    return max(r.spec.r for r in readers.values())


def combination(bank: Bank, coefs: dict[str, float], combine: str, rank: int | None = None, *,
                readers: dict | None = None) -> dict[str, Factors]:
    """Every module's combined factors; only entries with a nonzero coefficient are read."""
    used = [n for n, w in coefs.items() if w > 0]
    readers = open_readers(bank, used) if readers is None else {n: readers[n] for n in used}
    return dict(combine_modules(readers, coefs, combine, rank or bank_rank(readers)))
