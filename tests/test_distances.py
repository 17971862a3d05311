"""Distances against independent references (scipy, POT, brute force) plus properties."""

from __future__ import annotations

import numpy as np
import ot
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.spatial.distance import cdist, jensenshannon
from scipy.stats import entropy, wasserstein_distance

from lorablend import distances as D

SETTINGS = settings(max_examples=30, deadline=None)
SCALES = (0.2, 0.5, 0.9, 1.3)
IDS = st.integers(0, 9).map(float)


@st.composite
def bank(draw, max_vocab=12, max_rows=4):
    """A query histogram and a bank of histograms over one small vocabulary, none all-zero."""
    vocab = draw(st.integers(1, max_vocab))
    rows = draw(st.integers(1, max_rows))
    counts = arrays(np.int64, (rows + 1, vocab), elements=st.integers(0, 6))
    h = draw(counts.filter(lambda a: bool(np.all(a.sum(axis=1) > 0))))
    return h[0].astype(float), h[1:].astype(float)


@st.composite
def clouds(draw, max_n=6, max_d=3):
    """A query cloud and a small bank of clouds of different sizes, same dimension."""
    d = draw(st.integers(1, max_d))
    coords = st.floats(-5, 5, allow_nan=False, width=32)
    X = draw(arrays(np.float64, (draw(st.integers(1, max_n)), d), elements=coords))
    sizes = draw(st.lists(st.integers(1, max_n), min_size=1, max_size=3))
    return X, [draw(arrays(np.float64, (n, d), elements=coords)) for n in sizes]


def smoothed(h, eps=1e-10):
    h = h / h.sum()
    return (h + eps) / (h + eps).sum()


def expand(counts):
    return np.repeat(np.arange(counts.size), counts.astype(int))


def imq(a, b):
    return sum(s * s / (s * s + (a - b) ** 2) for s in SCALES)


# --------------------------------------------------------------------------- #
# Histogram distances against references
# --------------------------------------------------------------------------- #


@SETTINGS
@given(bank())
def test_wasserstein_ids_matches_scipy_on_expanded_ids(data):
    p, Q = data
    expected = [wasserstein_distance(expand(p), expand(q)) for q in Q]
    np.testing.assert_allclose(D.wasserstein_ids(p, Q), expected, rtol=0, atol=1e-9)


@SETTINGS
@given(bank())
def test_js_matches_scipy(data):
    p, Q = data
    got = D.js_histograms(p, Q)
    expected = [jensenshannon(smoothed(p), smoothed(q)) ** 2 for q in Q]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9)
    # Without smoothing it is scipy's divergence on the raw counts.
    raw = [jensenshannon(p, q) ** 2 for q in Q]
    np.testing.assert_allclose(D.js_histograms(p, Q, eps=0.0), raw, rtol=0, atol=1e-9)
    assert np.all(got <= np.log(2) + 1e-12)


@SETTINGS
@given(bank())
def test_kl_matches_direct_formula_and_scipy_entropy(data):
    p, Q = data
    got = D.kl_histograms(p, Q)
    ps = smoothed(p)
    direct = [np.sum(ps * np.log(ps / smoothed(q))) for q in Q]
    np.testing.assert_allclose(got, direct, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(got, [entropy(ps, smoothed(q)) for q in Q], rtol=1e-9, atol=1e-9)


def test_kl_is_not_symmetric_and_finite_on_disjoint_support():
    p, q = np.array([1.0, 0.0]), np.array([1.0, 1.0])
    forward, backward = D.kl_histograms(p, q[None])[0], D.kl_histograms(q, p[None])[0]
    np.testing.assert_allclose(forward, np.log(2), atol=1e-9)  # KL(p || q) with q uniform
    assert backward > forward + 1  # q has mass where p (smoothed) has almost none
    assert np.isfinite(backward)


def test_histogram_distances_hand_computed():
    p = np.array([1.0, 0.0, 0.0])
    q = np.array([0.0, 0.0, 2.0])
    assert D.wasserstein_ids(p, q[None])[0] == pytest.approx(2.0)  # all mass moves from id 0 to id 2
    assert D.js_histograms(p, q[None], eps=0.0)[0] == pytest.approx(np.log(2))  # disjoint supports


# --------------------------------------------------------------------------- #
# Histogram distances: properties
# --------------------------------------------------------------------------- #

HISTOGRAM_DISTANCES = [D.wasserstein_ids, D.kl_histograms, D.js_histograms]


@SETTINGS
@given(bank())
def test_histogram_distances_nonnegative_and_zero_on_identical(data):
    p, Q = data
    for distance in HISTOGRAM_DISTANCES:
        assert np.all(distance(p, Q) >= 0)
        # Scaling counts does not change the distribution.
        np.testing.assert_allclose(distance(p, np.vstack([p, 3 * p])), 0.0, atol=1e-12)


@SETTINGS
@given(bank(max_rows=1))
def test_wasserstein_and_js_symmetric(data):
    p, Q = data
    q = Q[0]
    for distance in (D.wasserstein_ids, D.js_histograms):
        np.testing.assert_allclose(distance(p, q[None]), distance(q, p[None]), rtol=1e-12, atol=1e-15)


@SETTINGS
@given(bank())
def test_sparse_and_dense_bank_identical(data):
    p, Q = data
    for distance in HISTOGRAM_DISTANCES:
        dense = distance(p, Q)
        np.testing.assert_array_equal(distance(p, sp.csr_matrix(Q)), dense)
        np.testing.assert_array_equal(distance(p, sp.coo_array(Q)), dense)
        np.testing.assert_array_equal(distance(sp.csr_matrix(p), Q), dense)


def test_row_chunking_does_not_change_results(monkeypatch):
    rng = np.random.default_rng(0)
    p, Q = rng.integers(0, 5, 50).astype(float) + 1, rng.integers(0, 5, (23, 50)).astype(float) + 1
    whole = {distance: distance(p, Q) for distance in HISTOGRAM_DISTANCES}
    monkeypatch.setattr(D, "_CHUNK_BYTES", 8 * 50 * 4)  # 4 rows per chunk, last chunk partial
    for distance in HISTOGRAM_DISTANCES:
        np.testing.assert_allclose(distance(p, Q), whole[distance], rtol=1e-12)
        np.testing.assert_allclose(distance(p, sp.csr_matrix(Q)), whole[distance], rtol=1e-12)


@pytest.mark.parametrize(
    "p, Q, message",
    [
        (np.ones(3), np.ones((2, 4)), "vocabulary sizes differ"),
        (np.ones(3), np.ones((0, 3)), "non-empty 2-D"),
        (np.ones(3), np.ones(3), "non-empty 2-D"),
        (np.zeros(3), np.ones((2, 3)), "no counts"),
        (np.array([]), np.ones((2, 0)), "empty"),
        (np.ones(3), np.array([[1.0, 1, 1], [0, 0, 0]]), "bank histogram 1 has no counts"),
        (np.ones(3), np.array([[1.0, -1, 1]]), "non-negative"),
        (np.array([1.0, np.nan, 1]), np.ones((1, 3)), "non-negative"),
    ],
)
def test_histogram_validation(p, Q, message):
    for distance in HISTOGRAM_DISTANCES:
        with pytest.raises(ValueError, match=message):
            distance(p, Q)


# --------------------------------------------------------------------------- #
# MMD on sampled token ids
# --------------------------------------------------------------------------- #


def brute_force_mmd(x, y):
    def mean_k(a, b):
        return sum(imq(ai, bj) for ai in a for bj in b) / (len(a) * len(b))

    return mean_k(x, x) + mean_k(y, y) - 2 * mean_k(x, y)


@SETTINGS
@given(
    arrays(np.float64, st.integers(1, 7), elements=IDS),
    arrays(np.float64, st.tuples(st.integers(1, 3), st.integers(1, 7)), elements=IDS),
)
def test_mmd_ids_matches_brute_force(x, Y):
    got = D.mmd_ids(x, Y)
    np.testing.assert_allclose(got, [brute_force_mmd(x, y) for y in Y], rtol=1e-9, atol=1e-12)
    assert np.all(got >= 0)
    np.testing.assert_allclose(D.mmd_ids(Y[0], x[None]), got[0], rtol=1e-9, atol=1e-12)  # symmetric
    assert np.all(D.mmd_ids(x, np.vstack([x, x[::-1]])) == 0)  # same multiset of ids


def test_mmd_ids_two_single_points_closed_form():
    a, b = 3.0, 5.0
    expected = 2 * len(SCALES) - 2 * imq(a, b)  # k(a,a) = k(b,b) = number of scales
    assert D.mmd_ids(np.array([a]), np.array([[b]]))[0] == pytest.approx(expected, rel=1e-12)


def test_mmd_ids_validation():
    with pytest.raises(ValueError, match="1-D"):
        D.mmd_ids(np.ones((2, 2)), np.ones((1, 2)))
    with pytest.raises(ValueError, match="2-D"):
        D.mmd_ids(np.ones(2), np.ones(2))
    with pytest.raises(ValueError, match="scales"):
        D.mmd_ids(np.ones(2), np.ones((1, 2)), scales=(0.0,))


def test_sample_ids_seeded_and_follows_counts():
    counts = np.array([0.0, 1.0, 0.0, 3.0])
    a = D.sample_ids(counts, 4000, np.random.default_rng(7))
    b = D.sample_ids(counts, 4000, np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.float64 and a.shape == (4000,)
    assert set(np.unique(a)) <= {1.0, 3.0}
    assert np.mean(a == 3.0) == pytest.approx(0.75, abs=0.03)
    with pytest.raises(TypeError):
        D.sample_ids(counts, 10, 7)


def test_sampled_mmd_ranks_the_matching_dataset_first():
    rng = np.random.default_rng(0)
    near, far = np.r_[np.ones(20), np.zeros(80)], np.r_[np.zeros(80), np.ones(20)]
    query = near + 0.1
    Y = np.stack([D.sample_ids(h, 300, rng) for h in (far, near)])
    assert np.argmin(D.mmd_ids(D.sample_ids(query, 300, rng), Y)) == 1


# --------------------------------------------------------------------------- #
# Embedding clouds
# --------------------------------------------------------------------------- #


def reference_emd(X, Y):
    a, b = np.full(len(X), 1 / len(X)), np.full(len(Y), 1 / len(Y))
    return ot.emd2(a, b, cdist(X, Y))


@SETTINGS
@given(clouds())
def test_wasserstein_clouds_matches_emd_and_properties(data):
    X, Ys = data
    got = D.wasserstein_clouds(X, Ys)
    np.testing.assert_allclose(got, [reference_emd(X, Y) for Y in Ys], rtol=1e-9, atol=1e-9)
    assert np.all(got >= 0)
    np.testing.assert_allclose(D.wasserstein_clouds(Ys[0], [X]), got[0], rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(D.wasserstein_clouds(X, [X, X[::-1]]), 0.0, atol=1e-9)


def test_wasserstein_clouds_1d_matches_scipy_with_unequal_sizes():
    rng = np.random.default_rng(1)
    X, Y = rng.normal(size=(40, 1)), rng.normal(1.0, 2.0, size=(25, 1))
    assert D.wasserstein_clouds(X, [Y])[0] == pytest.approx(wasserstein_distance(X[:, 0], Y[:, 0]), rel=1e-9)


def test_sliced_wasserstein_on_large_clouds():
    rng = np.random.default_rng(2)
    # 2001 * 2000 > 2000**2 triggers the sliced path with the default exact_max; in 1-D it is exact.
    X, Y = rng.normal(size=(2001, 1)), rng.normal(0.5, 1.0, size=(2000, 1))
    got = D.wasserstein_clouds(X, [Y])[0]
    assert got == pytest.approx(wasserstein_distance(X[:, 0], Y[:, 0]), rel=1e-9)

    # In 3-D it is an approximation (a lower bound); compare loosely with exact W1.
    X, Y = rng.normal(size=(300, 3)), rng.normal(size=(300, 3)) + [2.0, 0.0, 0.0]
    exact = D.wasserstein_clouds(X, [Y])[0]
    sliced = D.wasserstein_clouds(X, [Y], exact_max=100)[0]
    assert 0.3 * exact < sliced <= exact + 1e-9
    assert D.wasserstein_clouds(X, [Y], exact_max=100)[0] == sliced  # same seed, same value
    assert D.wasserstein_clouds(X, [Y], exact_max=100, seed=1)[0] != sliced


def test_wasserstein_clouds_never_mixes_exact_and_sliced():
    rng = np.random.default_rng(3)
    X, small, large = rng.normal(size=(20, 2)), rng.normal(size=(5, 2)), rng.normal(size=(30, 2))
    mixed = D.wasserstein_clouds(X, [small, large], exact_max=20)  # 20*5 fits, 20*30 does not
    alone = D.wasserstein_clouds(X, [small], exact_max=1)
    assert mixed[0] == alone[0]
    assert mixed[0] != pytest.approx(D.wasserstein_clouds(X, [small])[0])


def brute_force_mmd_clouds(X, Y):
    Z = np.vstack([X, Y])
    dists = [np.linalg.norm(Z[i] - Z[j]) for i in range(len(Z)) for j in range(i + 1, len(Z))]
    dists = [d for d in dists if d > 0]
    if not dists:
        return 0.0
    sigma = np.median(dists)

    def mean_k(A, B):
        return np.mean([np.exp(-np.sum((a - b) ** 2) / (2 * sigma**2)) for a in A for b in B])

    return max(mean_k(X, X) + mean_k(Y, Y) - 2 * mean_k(X, Y), 0.0)


@SETTINGS
@given(clouds())
def test_mmd_clouds_matches_brute_force_and_properties(data):
    X, Ys = data
    got = D.mmd_clouds(X, Ys)
    np.testing.assert_allclose(got, [brute_force_mmd_clouds(X, Y) for Y in Ys], rtol=1e-7, atol=1e-10)
    assert np.all(got >= 0)
    np.testing.assert_allclose(D.mmd_clouds(Ys[0], [X]), got[0], rtol=1e-9, atol=1e-12)
    assert np.all(D.mmd_clouds(X, [X, X.copy()]) == 0)


def test_mmd_clouds_two_single_points_closed_form():
    # The only pooled distance is |a - b| = sigma, so MMD^2 = 2 - 2 exp(-1/2) wherever the points are.
    for a, b in [([0.0, 0.0], [1.0, 0.0]), ([3.0, -1.0], [-7.0, 2.5])]:
        got = D.mmd_clouds(np.array([a]), [np.array([b])])[0]
        assert got == pytest.approx(2 - 2 * np.exp(-0.5), rel=1e-12)


def test_mmd_clouds_scale_invariant():
    rng = np.random.default_rng(4)
    X, Ys = rng.normal(size=(30, 4)), [rng.normal(0.5, 1.0, size=(20, 4)), rng.normal(size=(25, 4))]
    np.testing.assert_allclose(D.mmd_clouds(100 * X, [100 * Y for Y in Ys]), D.mmd_clouds(X, Ys), rtol=1e-9)


@pytest.mark.parametrize("distance", [D.wasserstein_clouds, D.mmd_clouds])
def test_cloud_validation(distance):
    with pytest.raises(ValueError, match="embedding dims differ"):
        distance(np.ones((3, 2)), [np.ones((3, 2)), np.ones((3, 3))])
    with pytest.raises(ValueError, match="bank Ys is empty"):
        distance(np.ones((3, 2)), [])
    with pytest.raises(ValueError, match="X must be a non-empty 2-D"):
        distance(np.ones((0, 2)), [np.ones((3, 2))])
    with pytest.raises(ValueError, match=r"Ys\[0\] must be a non-empty 2-D"):
        distance(np.ones((3, 2)), [np.ones(3)])


# --------------------------------------------------------------------------- #
# Codebook: clouds to histograms
# --------------------------------------------------------------------------- #


def test_codebook_histograms_counts_nearest_rows():
    codebook = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    X = np.array([[1.0, 1.0], [9.0, 1.0], [11.0, -1.0], [-1.0, 0.5]])
    got = D.codebook_histograms(X, codebook)
    np.testing.assert_array_equal(got, [2.0, 2.0, 0.0])
    assert got.dtype == np.float64
    with pytest.raises(ValueError, match="embedding dims differ"):
        D.codebook_histograms(X, np.ones((2, 3)))


def test_fit_codebook_deterministic_and_feeds_histogram_divergences():
    rng = np.random.default_rng(5)
    points = np.vstack([rng.normal(c, 0.1, size=(40, 3)) for c in (0.0, 5.0, 10.0)])
    a, b = D.fit_codebook(points, 3, seed=0), D.fit_codebook(points, 3, seed=0)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (3, 3) and a.dtype == np.float64
    query = D.codebook_histograms(points[:40], a)
    bank = np.stack([D.codebook_histograms(points[40:80], a), D.codebook_histograms(points[:40], a)])
    assert np.argmin(D.js_histograms(query, bank)) == 1
    assert np.argmin(D.kl_histograms(query, bank)) == 1


def test_fit_codebook_reduces_k_to_distinct_points():
    points = np.array([[0.0, 1.0], [0.0, 1.0], [2.0, 3.0]])
    codebook = D.fit_codebook(points, 5, seed=0)
    assert codebook.shape == (2, 2)
    np.testing.assert_array_equal(D.codebook_histograms(points, codebook).sum(), 3.0)
    with pytest.raises(ValueError, match="k must be"):
        D.fit_codebook(points, 0, seed=0)
