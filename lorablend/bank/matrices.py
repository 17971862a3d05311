"""Matrices over the whole bank: distances between every pair of its datasets and the Gram matrix of its adapters,
accumulated without stacking the bank and cached per bank; the neural fit and `calibrate` read them."""

from __future__ import annotations

import errno
import hashlib
from pathlib import Path

import numpy as np

from lorablend.atomic import atomic_file
from lorablend.bank.combination import open_readers
from lorablend.bank.manifest import Bank
from lorablend.sketch import distances_to_bank, index_dir, load_sketches


def distance_matrix(bank: Bank, sketch: str, metric: str, seed: int = 0) -> np.ndarray:
    """Row t: distances from entry t's dataset to every entry (diagonal included)."""
    _, sk = load_sketches(bank, sketch)
    queries = [sk.counts[i].toarray().ravel() for i in range(len(sk.names))] if sk.counts is not None else sk.clouds
    return np.stack([distances_to_bank(sk, metric, q, seed) for q in queries])


def gram(bank: Bank, space: str = "params") -> np.ndarray:
    """G[i, j] = <θ_i, θ_j>, one module at a time.

    `params`: θ = the flattened A and s·B (what the paper's combine averages).
    `update`: θ = the dense update s·B A, via tr((BᵢᵀBⱼ)(AⱼAᵢᵀ)) on r x r blocks,
    which matches the exact combiners (cat, svd).
    """
    readers = open_readers(bank, bank.names)
    names = bank.names
    G = np.zeros((len(names), len(names)))
    for module in readers[names[0]].modules:
        fs = [readers[n].factors(module) for n in names]
        if space == "params":
            F = np.stack([np.concatenate([f.A.ravel(), (f.scale * f.B).ravel()]) for f in fs]).astype(np.float64)
            G += F @ F.T
        else:
            for i, fi in enumerate(fs):
                for j, fj in enumerate(fs[: i + 1]):
                    v = fi.scale * fj.scale * np.trace((fi.B.T @ fj.B) @ (fj.A @ fi.A.T))
                    G[i, j] += v
                    G[j, i] += v if i != j else 0.0
    return G


def cached_array(path: Path, make, status=None) -> np.ndarray:
    """`make()` saved once at `path`; where nothing can be written there, computed each time instead."""
    if path.exists():
        return np.load(path)
    if status:
        status(f"computing {path.stem}")
    value = make()
    try:
        with atomic_file(path) as fh:
            np.save(fh, value)
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
    return value


def bank_matrices(bank: Bank, sketch: str, metric: str, space: str) -> tuple[np.ndarray, np.ndarray]:
    """D (seed 0) and G of this bank, kept in lorablend's cache (never in the bank, which may be shared or
    read-only) under the hashes of the bank manifest and of its index, so a rebuilt bank or index is recomputed."""
    from lorablend.runtime.models import lorablend_home

    key = hashlib.sha256(bank.sha256.encode() + (index_dir(bank) / "index.json").read_bytes()).hexdigest()[:16]
    cache = lorablend_home() / "bank-matrices" / key
    D = cached_array(cache / f"D-{sketch}-{metric}.npy", lambda: distance_matrix(bank, sketch, metric))
    G = cached_array(cache / f"G-{space}.npy", lambda: gram(bank, space))
    return D, G
