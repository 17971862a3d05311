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

from lorablend.errors import suggest

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
    """Exact stacked factors (A_cat: R x k, B_cat: d x R) of sum c_i s_i B_i A_i, in float64.

    Only adapters with c_i > 0 are stacked. The weight w_i = c_i s_i is split
    as sqrt|w_i| on each side (sign on A) so neither factor's magnitude blows up.
    Written into two preallocated arrays: per-adapter float64 temporaries cost as
    much as the algebra at Mistral-7B shapes.
    """
    used = [(f, ci * f.scale) for f, ci in zip(factors, c) if ci > 0]
    A = np.empty((sum(f.rank for f, _ in used), used[0][0].A.shape[1]))
    B = np.empty((used[0][0].B.shape[0], len(A)))
    pos = 0
    for f, w in used:
        a, b = A[pos : pos + f.rank], B[:, pos : pos + f.rank]
        a[...] = f.A
        a *= np.sign(w) * np.sqrt(abs(w))
        b[...] = f.B
        b *= np.sqrt(abs(w))
        pos += f.rank
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
    A, B = np.zeros(used[0][0].A.shape), np.zeros(used[0][0].B.shape)
    tA, tB = np.empty_like(A), np.empty_like(B)  # accumulated in place: no temporaries per adapter
    for f, ci in used:
        A += np.multiply(f.A, ci, out=tA)  # ci is float64: the product is taken in float64
        B += np.multiply(f.B, ci * f.scale, out=tB)
    return _out(A, B)


def combine_cat(factors: Sequence[Factors], coefs) -> Factors:
    """Exact combination by concatenating factors; rank = sum of used ranks."""
    A, B = _stack(factors, _validate(factors, coefs))
    return _out(A, B)


def combine_svd(factors: Sequence[Factors], coefs, rank: int) -> Factors:
    """Best rank-`rank` approximation of the exact update (Eckart–Young optimum).

    With the stacked factors M = B A (B: d x R, A: R x k) and R <= min(d, k), all work after
    the stacking is R x R, never d x k: B^T B = V diag(lam) V^T gives an orthonormal basis
    Q_b = B V diag(lam^-1/2) of B's columns and B = Q_b C_b (C_b = diag(lam^1/2) V^T), so
    Q_b^T M M^T Q_b = C_b (A A^T) C_b^T; its top eigenpairs are M's squared singular values
    and, mapped by Q_b, its left singular vectors; the right ones are U^T C_b A / S. Two Gram
    products replace two d x R QRs (4x faster at Mistral shapes). Directions of B with
    lam < R eps lam_max (duplicate or all-zero adapters) are dropped: < ~1e-7 of the norm.
    When R > min(d, k) (dense coefficients over a large bank) the update itself is the
    smaller object: it is formed and its top subspace taken from M M^T or M^T M.

    Output rank is min(rank, R, d, k); when R <= rank the result is exact. Singular-vector
    signs are fixed (largest-magnitude entry of each left vector positive) so results do
    not depend on the LAPACK build's sign conventions.
    """
    from scipy.linalg import eigh

    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
        raise ValueError(f"svd rank must be an integer >= 1, got {rank!r}")
    A, B = _stack(factors, _validate(factors, coefs))
    R, d, k = A.shape[0], B.shape[0], A.shape[1]
    r = min(int(rank), R, d, k)
    left, right = np.zeros((d, r)), np.zeros((r, k))
    if R > min(d, k):
        M = B @ A
        on_left = d <= k
        G = M @ M.T if on_left else M.T @ M
        s2, V = eigh(G, subset_by_index=[len(G) - r, len(G) - 1])
        V, S = V[:, ::-1], np.sqrt(np.maximum(s2[::-1], 0.0))
        if on_left:
            left[...] = V
            np.divide(V.T @ M, S[:, None], out=right, where=S[:, None] > 0)
        else:
            right[...] = V.T
            np.divide(M @ V, S[None, :], out=left, where=S[None, :] > 0)
    else:
        lam, V = np.linalg.eigh(B.T @ B)
        keep = lam > max(lam[-1], 0.0) * R * np.finfo(np.float64).eps
        lam, V = lam[keep], V[:, keep]
        S = np.zeros(r)
        if len(lam):
            root = np.sqrt(lam)
            Cb = root[:, None] * V.T
            K = Cb @ (A @ A.T) @ Cb.T
            m = min(r, len(K))  # beyond B's numerical rank the singular values are zero (left as zeros)
            s2, U = eigh(K, subset_by_index=[len(K) - m, len(K) - 1])
            U, S[:m] = U[:, ::-1], np.sqrt(np.maximum(s2[::-1], 0.0))
            left[:, :m] = B @ ((V / root[None, :]) @ U)
            np.divide((U.T @ Cb) @ A, S[:m, None], out=right[:m], where=S[:m, None] > 0)
    sign = np.where(left[np.argmax(np.abs(left), axis=0), np.arange(r)] < 0, -1.0, 1.0)
    root = np.sqrt(S)
    return _out((sign * root)[:, None] * right, left * (sign * root))


def combine_factors(method: str, factors: Sequence[Factors], coefs, rank: int | None = None) -> Factors:
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
