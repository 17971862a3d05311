"""Dataset-to-dataset distances: one query sketch against every bank entry at once.

A dataset is sketched either as a histogram of token ids (the paper's way,
arXiv 2507.01806) or as a point cloud of per-example embeddings. Every distance
takes one query and the whole bank and returns a float64 array with one value
per bank entry, so the caller ranks adapters with a single `argsort`.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import scipy.sparse as sp
from scipy.cluster.vq import kmeans2, vq
from scipy.spatial.distance import cdist
from scipy.special import entr, rel_entr

# Bytes per dense float64 chunk of bank rows; a few temporaries of this size stay
# well under ~100 MB even for a 1000 x 50k-vocabulary bank.
_CHUNK_BYTES = 16 * 2**20


# --------------------------------------------------------------------------- #
# Token-id histograms
# --------------------------------------------------------------------------- #


def _histogram(p) -> np.ndarray:
    """The query as a dense float64 count vector (a sparse 1-row matrix is fine)."""
    p = np.asarray(p.toarray() if sp.issparse(p) else p, dtype=np.float64).ravel()
    if p.size == 0:
        raise ValueError("query histogram is empty (vocabulary of size 0)")
    if not np.all(np.isfinite(p)) or p.min() < 0:
        raise ValueError("query histogram must hold finite, non-negative counts")
    if p.sum() <= 0:
        raise ValueError("query histogram has no counts (all bins are zero)")
    return p


def _bank_chunks(Q, vocab: int) -> Iterator[np.ndarray]:
    """Dense float64 row blocks of the bank, so memory stays bounded for any bank size."""
    Q = Q.tocsr() if sp.issparse(Q) else np.asarray(Q)
    if Q.ndim != 2 or Q.shape[0] == 0:
        raise ValueError(f"bank histograms must be a non-empty 2-D (m, V) array, got shape {Q.shape}")
    if Q.shape[1] != vocab:
        raise ValueError(f"vocabulary sizes differ: query has {vocab} bins, bank has {Q.shape[1]}")
    rows = max(1, _CHUNK_BYTES // (8 * vocab))
    for start in range(0, Q.shape[0], rows):
        block = Q[start : start + rows]
        block = np.asarray(block.toarray() if sp.issparse(block) else block, dtype=np.float64)
        if not np.all(np.isfinite(block)) or block.min() < 0:
            raise ValueError("bank histograms must hold finite, non-negative counts")
        empty = np.flatnonzero(block.sum(axis=1) <= 0)
        if empty.size:
            raise ValueError(f"bank histogram {start + int(empty[0])} has no counts (all bins are zero)")
        yield block


def _normalise(h: np.ndarray) -> np.ndarray:
    return h / h.sum(axis=-1, keepdims=True)


def _smooth(h: np.ndarray, eps: float) -> np.ndarray:
    """The paper's smoothing: normalise, add eps to every bin, renormalise, so KL stays finite."""
    return _normalise(_normalise(h) + eps)


def _per_entry(p, Q, distance) -> np.ndarray:
    """Apply `distance(query, bank_block) -> (rows,)` over bounded row blocks of the bank."""
    p = _histogram(p)
    return np.concatenate([distance(p, block) for block in _bank_chunks(Q, p.size)])


def _check_eps(eps: float) -> None:
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")


def wasserstein_ids(p, Q) -> np.ndarray:
    """W1 between token-id distributions with ids read as numbers on the integer line.

    This is the paper's WD (scipy's `wasserstein_distance` on the raw id arrays),
    computed exactly from histograms as sum_k |CDF_p(k) - CDF_q(k)|, so the
    expanded id arrays are never materialised. Note that it rewards nearby id
    *numbers*, which only loosely reflect token meaning.
    """

    def distance(p, block):
        return np.abs(np.cumsum(_normalise(block), axis=1) - np.cumsum(_normalise(p))).sum(axis=1)

    return _per_entry(p, Q, distance)


def kl_histograms(p, Q, eps: float = 1e-10) -> np.ndarray:
    """The paper's KL(new || bank) on smoothed token histograms (natural log).

    Asymmetric: it penalises tokens the new dataset uses that a bank entry lacks.
    """
    _check_eps(eps)

    def distance(p, block):
        return np.maximum(rel_entr(_smooth(p, eps), _smooth(block, eps)).sum(axis=1), 0.0)

    return _per_entry(p, Q, distance)


def js_histograms(p, Q, eps: float = 1e-10) -> np.ndarray:
    """Jensen-Shannon divergence (natural log, at most ln 2) of smoothed token histograms.

    A symmetric, bounded alternative to KL; this is the divergence itself, i.e.
    the square of `scipy.spatial.distance.jensenshannon`.
    """
    _check_eps(eps)

    def distance(p, block):
        # as H(mid) - (H(p) + H(q)) / 2: two logarithms per bin instead of two log-ratios (1.6x faster)
        p, q = _smooth(p, eps), _smooth(block, eps)
        return np.maximum(entr((p + q) / 2).sum(axis=1) - (entr(p).sum() + entr(q).sum(axis=1)) / 2, 0.0)

    return _per_entry(p, Q, distance)


def _weighted_ids(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct ids with their frequencies: token samples repeat a lot, so kernel matrices shrink."""
    values, counts = np.unique(ids, return_counts=True)
    return values, counts / ids.size


def _imq_mean(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray], scales: np.ndarray) -> float:
    """Mean over all sample pairs of the paper's kernel sum_s s^2 / (s^2 + (a-b)^2)."""
    sq = np.subtract.outer(a[0], b[0]) ** 2
    kernel = sum(s * s / (s * s + sq) for s in scales)
    return float(a[1] @ kernel @ b[1])


def mmd_ids(x, Y, scales: Sequence[float] = (0.2, 0.5, 0.9, 1.3)) -> np.ndarray:
    """The paper's biased MMD^2 between sampled token ids with a sum of inverse multiquadrics.

    Bank rows are processed one at a time, so memory is O(n * n2), never O(m * n * n2).
    With these small scales the kernel decays within a few ids, so it mostly
    measures how much the sampled ids overlap.
    """
    x = np.asarray(x, dtype=np.float64)
    Y = np.asarray(Y, dtype=np.float64)
    scales = np.asarray(scales, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"x must be a non-empty 1-D array of ids, got shape {x.shape}")
    if Y.ndim != 2 or 0 in Y.shape:
        raise ValueError(f"Y must be a non-empty 2-D (m, n2) array of ids, got shape {Y.shape}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(Y))):
        raise ValueError("ids contain NaN or infinite values")
    if scales.ndim != 1 or scales.size == 0 or np.any(scales <= 0):
        raise ValueError("scales must be a non-empty sequence of positive numbers")
    x = _weighted_ids(x)
    k_xx = _imq_mean(x, x, scales)
    mmd = []
    for y in Y:
        y = _weighted_ids(y)
        mmd.append(k_xx + _imq_mean(y, y, scales) - 2 * _imq_mean(x, y, scales))
    return np.maximum(np.array(mmd, dtype=np.float64), 0.0)


def sample_ids(counts, n: int, rng: np.random.Generator) -> np.ndarray:
    """Draw n token ids with replacement from a histogram, to feed `mmd_ids`.

    Seeded (the paper's sampling was not), so MMD scores are reproducible.
    Returns float64 ids, the type `mmd_ids` computes with.
    """
    if not isinstance(rng, np.random.Generator):
        raise TypeError("rng must be a numpy.random.Generator (e.g. numpy.random.default_rng(seed))")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    counts = _histogram(counts)
    return rng.choice(counts.size, size=n, p=_normalise(counts)).astype(np.float64)


# --------------------------------------------------------------------------- #
# Embedding point clouds
# --------------------------------------------------------------------------- #


def _cloud(X, name: str) -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or 0 in X.shape:
        raise ValueError(f"{name} must be a non-empty 2-D (n, d) array, got shape {X.shape}")
    if not np.all(np.isfinite(X)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return X


def _same_dim(X: np.ndarray, other: np.ndarray, name: str) -> np.ndarray:
    if other.shape[1] != X.shape[1]:
        raise ValueError(f"embedding dims differ: X has d={X.shape[1]}, {name} has d={other.shape[1]}")
    return other


def _clouds(X, Ys) -> tuple[np.ndarray, list[np.ndarray]]:
    """Validated query and bank clouds sharing one embedding dimension."""
    X = _cloud(X, "X")
    if len(Ys) == 0:
        raise ValueError("bank Ys is empty")
    return X, [_same_dim(X, _cloud(Y, f"Ys[{i}]"), f"Ys[{i}]") for i, Y in enumerate(Ys)]


def _exact_w1(X: np.ndarray, Y: np.ndarray) -> float:
    import ot  # imported where used: POT loads torch through its backends, seconds at every CLI start

    n, n_y = len(X), len(Y)
    # scipy's cdist, not ot.dist: POT's |x|^2 + |y|^2 - 2xy form leaves ~1e-8 at
    # zero distance after the sqrt, so identical clouds would not score 0.
    cost = cdist(X, Y)
    # POT's default iteration cap stops large problems short of the optimum.
    iterations = max(100_000, 50 * n * n_y)
    return float(ot.emd2(np.full(n, 1.0 / n), np.full(n_y, 1.0 / n_y), cost, numItermax=iterations))


def wasserstein_clouds(X, Ys, exact_max: int = 2000, n_projections: int = 256, seed: int = 0) -> np.ndarray:
    """W1 between embedding clouds (Euclidean cost, uniform weights).

    Exact optimal transport costs O(n * n_i) memory and super-quadratic time, so
    when any pair has n * n_i > exact_max**2 the *whole bank* switches to sliced W1
    (`n_projections` random directions drawn from `seed`). Sliced W1 is an
    approximation: a lower bound that gets much smaller as d grows, so it is not
    on the exact scale, and the two are never mixed in one result.
    """
    import ot

    X, Ys = _clouds(X, Ys)
    if all(len(X) * len(Y) <= exact_max**2 for Y in Ys):
        return np.array([_exact_w1(X, Y) for Y in Ys], dtype=np.float64)
    return np.array(
        [ot.sliced_wasserstein_distance(X, Y, n_projections=n_projections, p=1, seed=seed) for Y in Ys],
        dtype=np.float64,
    )


def _upper(d: np.ndarray) -> np.ndarray:
    """Distances between distinct points of one cloud (strict upper triangle)."""
    return d[np.triu_indices(len(d), 1)]


def mmd_clouds(X, Ys) -> np.ndarray:
    """Biased MMD^2 with a Gaussian kernel whose bandwidth follows each pair's median distance.

    The median heuristic makes the score insensitive to the embedding's overall
    scale. The median is over distances between points of the pooled sample with
    zero distances (self-pairs and exact duplicates) left out, so sigma stays
    positive. Memory is O((n + n_i)^2) per pair.
    """
    X, Ys = _clouds(X, Ys)
    d_xx = cdist(X, X)
    upper_xx, sq_xx = _upper(d_xx), d_xx**2
    mmd = []
    for Y in Ys:
        d_yy, d_xy = cdist(Y, Y), cdist(X, Y)
        pooled = np.concatenate([upper_xx, _upper(d_yy), d_xy.ravel()])
        pooled = pooled[pooled > 0]
        if pooled.size == 0:  # every point is the same one: the clouds coincide
            mmd.append(0.0)
            continue
        gamma = 1.0 / (2.0 * np.median(pooled) ** 2)
        k_xx, k_yy, k_xy = (np.mean(np.exp(-gamma * sq)) for sq in (sq_xx, d_yy**2, d_xy**2))
        mmd.append(k_xx + k_yy - 2 * k_xy)
    return np.maximum(np.array(mmd, dtype=np.float64), 0.0)


def codebook_histograms(X, codebook) -> np.ndarray:
    """Counts of each codebook row being nearest to a point of X.

    Turns an embedding cloud into a histogram over a shared codebook, so the
    histogram divergences (`kl_histograms`, `js_histograms`) apply to embeddings.
    """
    X = _cloud(X, "X")
    codebook = _same_dim(X, _cloud(codebook, "codebook"), "codebook")
    codes, _ = vq(X, codebook, check_finite=False)
    return np.bincount(codes, minlength=len(codebook)).astype(np.float64)


def fit_codebook(points, k: int, seed: int) -> np.ndarray:
    """k-means (k-means++ init) codebook, deterministic for a fixed seed.

    k is reduced to the number of distinct points, since extra centres could only
    be empty clusters. Fit it on the pooled bank (and query) embeddings so all
    histograms share bins.
    """
    points = _cloud(points, "points")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    k = min(k, len(np.unique(points, axis=0)))
    centroids, _ = kmeans2(points, k, seed=seed, minit="++", check_finite=False)
    return np.asarray(centroids, dtype=np.float64)


# --------------------------------------------------------------------------- #
# One entry point per (sketch, metric)
# --------------------------------------------------------------------------- #

METRICS = ("wd", "kl", "js", "mmd")
MMD_SAMPLES = 1000


def measure(metric: str, query, bank, *, codebook=None, seed: int = 0) -> np.ndarray:
    """Distances from one query sketch to every bank sketch.

    Token sketches: `query` a 1-D count vector, `bank` an (m, V) count matrix.
    Embedding sketches: `query` an (n, d) cloud, `bank` a list of clouds; KL and JS
    compare the clouds' histograms over `codebook` (fitted on the bank).
    MMD on tokens draws MMD_SAMPLES ids per side with generators seeded by
    (seed, row), so results are reproducible (the paper's sampling was not).
    """
    if metric not in METRICS:
        from lorablend.errors import suggest

        raise suggest(metric, METRICS, "metric")
    if np.ndim(query) == 1:
        if metric == "mmd":
            Q = bank.tocsr() if sp.issparse(bank) else np.asarray(bank)
            x = sample_ids(query, MMD_SAMPLES, np.random.default_rng([seed, 0]))
            rows = (Q[i].toarray().ravel() if sp.issparse(Q) else Q[i] for i in range(Q.shape[0]))
            Y = np.stack([sample_ids(r, MMD_SAMPLES, np.random.default_rng([seed, 1, i])) for i, r in enumerate(rows)])
            return mmd_ids(x, Y)
        return {"wd": wasserstein_ids, "kl": kl_histograms, "js": js_histograms}[metric](query, bank)
    if metric == "wd":
        return wasserstein_clouds(query, bank, seed=seed)
    if metric == "mmd":
        return mmd_clouds(query, bank)
    if codebook is None:
        raise ValueError("KL/JS on embeddings need the bank's codebook")
    p = codebook_histograms(query, codebook)
    Q = np.stack([codebook_histograms(c, codebook) for c in bank])
    return (kl_histograms if metric == "kl" else js_histograms)(p, Q)
