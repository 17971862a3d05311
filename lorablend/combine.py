"""Combine a bank of LoRA factors for one target module into a single adapter.

Adapter i contributes ``s_i * B_i @ A_i`` (A_i: r_i x k, B_i: d x r_i). Given
coefficients ``c_i >= 0`` the methods below return factors whose update
approximates (``paper``), equals (``cat``) or optimally truncates (``svd``)
``sum_i c_i s_i B_i A_i``. Outputs always carry ``scale == 1.0`` (the caller
writes ``lora_alpha = rank``) so adapters with different alphas / rsLoRA mix
correctly. Math runs in float64; factors are returned as float32 because that is
what the caller writes. No randomness: equal inputs give bit-identical outputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .errors import suggest

METHODS = ("paper", "cat", "svd")


@dataclass(frozen=True)
class Factors:
    """One LoRA update ``scale * B @ A`` for one module."""

    A: np.ndarray  # (r, k)
    B: np.ndarray  # (d, r)
    scale: float

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def delta(self) -> np.ndarray:
        """Dense d x k update in float64 (tests / reference only: it can be large)."""
        return self.scale * (np.asarray(self.B, np.float64) @ np.asarray(self.A, np.float64))


def _validate(factors: Sequence[Factors], coefs) -> np.ndarray:
    """Check shapes and coefficients; return the coefficients as float64."""
    c = np.asarray(coefs, dtype=np.float64).reshape(-1)
    if len(c) != len(factors):
        raise ValueError(f"got {len(c)} coefficients for {len(factors)} adapters")
    if not np.all(np.isfinite(c)) or np.any(c < 0):
        raise ValueError(f"coefficients must be finite and >= 0, got {c.tolist()}")
    if not np.any(c > 0):
        raise ValueError("at least one coefficient must be > 0")
    d, k = factors[0].B.shape[0], factors[0].A.shape[-1]
    for i, f in enumerate(factors):
        if np.ndim(f.A) != 2 or np.ndim(f.B) != 2:
            raise ValueError(f"adapter {i}: A and B must be 2-D, got {np.shape(f.A)} and {np.shape(f.B)}")
        if f.A.shape[0] != f.B.shape[1]:
            raise ValueError(f"adapter {i}: A has {f.A.shape[0]} rows but B has {f.B.shape[1]} columns")
        if f.A.shape[1] != k:
            raise ValueError(f"adapter {i}: A has {f.A.shape[1]} columns (in features), adapter 0 has {k}")
        if f.B.shape[0] != d:
            raise ValueError(f"adapter {i}: B has {f.B.shape[0]} rows (out features), adapter 0 has {d}")
        if not np.isfinite(f.scale):
            raise ValueError(f"adapter {i}: scale must be finite, got {f.scale}")
    return c


def _out(A: np.ndarray, B: np.ndarray) -> Factors:
    return Factors(A=np.ascontiguousarray(A, np.float32), B=np.ascontiguousarray(B, np.float32), scale=1.0)


def _stack(factors: Sequence[Factors], c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact stacked factors (A_cat: R x k, B_cat: d x R) of sum c_i s_i B_i A_i.

    Only adapters with c_i > 0 are stacked. The weight w_i = c_i s_i is split
    as sqrt|w_i| on each side (sign on A) so neither factor's magnitude blows up.
    """
    used = [(f, ci * f.scale) for f, ci in zip(factors, c) if ci > 0]
    A = np.vstack([np.sign(w) * np.sqrt(abs(w)) * np.asarray(f.A, np.float64) for f, w in used])
    B = np.hstack([np.sqrt(abs(w)) * np.asarray(f.B, np.float64) for f, w in used])
    return A, B


def combine_paper(factors: Sequence[Factors], coefs) -> Factors:
    """The paper's method: weighted averages of A and of B taken separately.

    Inexact, because (sum c_i B_i)(sum c_i A_i) != sum c_i B_i A_i: cross terms
    B_i A_j appear. Kept for reproducing the paper. Each scale is folded into
    its B first (B_i * s_i) so adapters with different alphas combine
    correctly; with equal scales this is the plain average of A and B. Needs
    equal ranks among the adapters with c_i > 0 (zero-weight ones are ignored).
    """
    c = _validate(factors, coefs)
    used = [(f, ci) for f, ci in zip(factors, c) if ci > 0]
    if len({f.rank for f, _ in used}) > 1:
        raise ValueError("paper combine needs equal ranks; use 'svd' or 'cat'")
    A = sum(ci * np.asarray(f.A, np.float64) for f, ci in used)
    B = sum(ci * f.scale * np.asarray(f.B, np.float64) for f, ci in used)
    return _out(A, B)


def combine_cat(factors: Sequence[Factors], coefs) -> Factors:
    """Exact combination by concatenating factors; rank = sum of used ranks."""
    A, B = _stack(factors, _validate(factors, coefs))
    return _out(A, B)


def combine_svd(factors: Sequence[Factors], coefs, rank: int) -> Factors:
    """Best rank-`rank` approximation of the exact update (Eckart–Young optimum).

    Never forms the d x k matrix: with B_cat = Q_b R_b and A_cat^T = Q_a R_a,
    the update is Q_b (R_b R_a^T) Q_a^T, so the SVD of the small core gives the
    update's SVD. Output rank is min(rank, R) for R stacked ranks (also capped
    by d and k); when R <= rank the result is exact. Singular-vector signs are
    fixed (largest-magnitude entry of each left vector positive) so results do
    not depend on the LAPACK build's sign conventions.
    """
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
        raise ValueError(f"svd rank must be an integer >= 1, got {rank!r}")
    A_cat, B_cat = _stack(factors, _validate(factors, coefs))
    Q_b, R_b = np.linalg.qr(B_cat)
    Q_a, R_a = np.linalg.qr(A_cat.T)
    U, S, Vt = np.linalg.svd(R_b @ R_a.T, full_matrices=False)
    r = min(int(rank), len(S))
    left = Q_b @ U[:, :r]
    right = Vt[:r] @ Q_a.T
    sign = np.where(left[np.argmax(np.abs(left), axis=0), np.arange(r)] < 0, -1.0, 1.0)
    root = np.sqrt(S[:r])
    return _out((sign * root)[:, None] * right, left * (sign * root))


def combine(method: str, factors: Sequence[Factors], coefs, rank: int | None = None) -> Factors:
    """Dispatch by method name; `rank` is required for 'svd' and ignored otherwise."""
    if method == "svd":
        if rank is None:
            raise ValueError("svd combine needs a rank")
        return combine_svd(factors, coefs, rank)
    if method == "cat":
        return combine_cat(factors, coefs)
    if method == "paper":
        return combine_paper(factors, coefs)
    raise suggest(method, METHODS, "combine method")
