import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lorablend.combine import Factors, combine_cat, combine_factors, combine_paper, combine_svd
from lorablend.errors import InputError

PROPS = settings(max_examples=30, deadline=None)


def make_bank(rng, d, k, ranks, scales=None, dtype=np.float32):
    scales = scales or [1.0] * len(ranks)
    return [
        Factors(A=rng.standard_normal((r, k)).astype(dtype), B=rng.standard_normal((d, r)).astype(dtype), scale=s)
        for r, s in zip(ranks, scales)
    ]


def exact(bank, c):
    return sum(ci * f.delta() for f, ci in zip(bank, c))


def rel(x, ref):
    return np.linalg.norm(x - ref) / np.linalg.norm(ref)


def best_rank(M, r):
    U, S, Vt = np.linalg.svd(M, full_matrices=False)
    return (U[:, :r] * S[:r]) @ Vt[:r]


MIXED_RANKS = [4, 8, 16]
MIXED_SCALES = [16 / 4, 32 / np.sqrt(8), 8 / 16]  # alpha/r, rsLoRA alpha/sqrt(r), alpha/r
COEFS = [0.5, 0.3, 0.2]


def test_cat_is_exact_with_mixed_ranks_and_scales():
    bank = make_bank(np.random.default_rng(0), 48, 40, MIXED_RANKS, MIXED_SCALES)
    out = combine_cat(bank, COEFS)
    assert out.rank == sum(MIXED_RANKS) and out.scale == 1.0
    assert out.A.dtype == out.B.dtype == np.float32
    assert rel(out.delta(), exact(bank, COEFS)) < 1e-6


def test_cat_skips_zero_coefficients():
    bank = make_bank(np.random.default_rng(1), 20, 12, MIXED_RANKS, MIXED_SCALES)
    out = combine_cat(bank, [0.6, 0.0, 0.4])
    assert out.rank == 4 + 16


def test_svd_matches_dense_truncated_svd():
    bank = make_bank(np.random.default_rng(2), 60, 50, MIXED_RANKS, MIXED_SCALES, dtype=np.float64)
    out = combine_svd(bank, COEFS, rank=6)
    assert out.rank == 6 and out.scale == 1.0 and out.A.dtype == np.float32
    assert rel(out.delta(), best_rank(exact(bank, COEFS), 6)) < 1e-5


@pytest.mark.parametrize("d, k", [(12, 40), (40, 12)])
def test_svd_matches_dense_truncated_svd_when_stacked_rank_exceeds_the_update(d, k):
    """Dense coefficients over a big bank: R > min(d, k), the branch that forms the update."""
    bank = make_bank(np.random.default_rng(5), d, k, MIXED_RANKS, MIXED_SCALES, dtype=np.float64)
    out = combine_svd(bank, COEFS, rank=5)
    assert out.rank == 5
    assert rel(out.delta(), best_rank(exact(bank, COEFS), 5)) < 1e-5
    full = combine_svd(bank, COEFS, rank=64)  # capped by min(d, k): the exact update
    assert full.rank == min(d, k) and rel(full.delta(), exact(bank, COEFS)) < 1e-6


@PROPS
@given(st.integers(0, 2**32 - 1))
def test_svd_is_the_best_rank_approximation_of_random_stacks(seed):
    """Random shapes, ranks, scales spanning 4 decades, duplicates and all-zero adapters."""
    rng = np.random.default_rng(seed)
    d, k, r = (int(x) for x in rng.integers([8, 8, 1], [60, 60, 6]))
    bank = [Factors(A=rng.standard_normal((r, k)), B=rng.standard_normal((d, r)) * 10 ** rng.uniform(-3, 1),
                    scale=float(rng.uniform(0.5, 2))) for _ in range(int(rng.integers(1, 14)))]
    bank += [bank[0]] if seed % 3 == 0 else []
    bank += [Factors(A=np.zeros((r, k)), B=np.zeros((d, r)), scale=1.0)] if seed % 4 == 0 else []
    c = rng.random(len(bank))
    rank = int(rng.integers(1, 20))
    M = exact(bank, c)
    out = combine_svd(bank, c, rank=rank)
    assert out.rank == min(rank, len(bank) * r, d, k)
    assert np.linalg.norm(out.delta() - best_rank(M, rank)) <= 1e-5 * np.linalg.norm(M)


def test_svd_of_duplicate_and_zero_adapters_keeps_the_requested_rank():
    rng = np.random.default_rng(6)
    (f,) = make_bank(rng, 30, 20, [4], dtype=np.float64)
    zero = Factors(A=np.zeros((4, 20)), B=np.zeros((30, 4)), scale=1.0)
    out = combine_svd([f, f, zero], [0.25, 0.25, 0.5], rank=6)
    assert out.rank == 6  # rank 4 of signal, two zero directions
    assert rel(out.delta(), 0.5 * f.delta()) < 1e-6


def test_svd_is_exact_when_total_rank_fits():
    bank = make_bank(np.random.default_rng(3), 30, 25, [2, 3], [2.0, 0.5])
    out = combine_svd(bank, [0.7, 0.3], rank=8)
    assert out.rank == 5
    assert rel(out.delta(), exact(bank, [0.7, 0.3])) < 1e-6


def test_svd_signs_are_normalised_and_output_depends_only_on_the_update():
    rng = np.random.default_rng(4)
    bank = make_bank(rng, 30, 20, [4, 4], [1.0, 2.0], dtype=np.float64)
    out = combine_svd(bank, [0.5, 0.5], rank=3)
    cols = out.B[np.argmax(np.abs(out.B), axis=0), np.arange(3)]
    assert np.all(cols > 0)
    # Same updates, different factorisation (B M, M^-1 A): same output factors.
    M = rng.standard_normal((4, 4)) + 4 * np.eye(4)
    reparam = [Factors(A=np.linalg.solve(M, f.A), B=f.B @ M, scale=f.scale) for f in bank]
    again = combine_svd(reparam, [0.5, 0.5], rank=3)
    np.testing.assert_allclose(again.A, out.A, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(again.B, out.B, rtol=1e-4, atol=1e-4)


def test_paper_is_weighted_average_of_parameters():
    s = 2.0
    bank = make_bank(np.random.default_rng(5), 16, 12, [4, 4, 4], [s] * 3)
    out = combine_paper(bank, COEFS)
    flat = [np.concatenate([f.A.ravel(), f.B.ravel()]).astype(np.float64) for f in bank]
    avg = sum(c * x for c, x in zip(COEFS, flat))
    # scale folded into B, output scale 1: same update as "average A and B, keep s"
    got = np.concatenate([out.A.ravel(), out.B.ravel() / s])
    np.testing.assert_allclose(got, avg, rtol=1e-6, atol=1e-6)
    assert out.scale == 1.0 and out.rank == 4


def test_paper_folds_unequal_scales_into_B():
    bank = make_bank(np.random.default_rng(6), 16, 12, [4, 4], [1.0, 3.0])
    out = combine_paper(bank, [0.25, 0.75])
    B = sum(c * f.scale * f.B.astype(np.float64) for f, c in zip(bank, [0.25, 0.75]))
    A = sum(c * f.A.astype(np.float64) for f, c in zip(bank, [0.25, 0.75]))
    assert rel(out.delta(), B @ A) < 1e-6


def test_paper_rejects_unequal_ranks():
    bank = make_bank(np.random.default_rng(7), 16, 12, [4, 8])
    with pytest.raises(ValueError, match="paper combine needs equal ranks"):
        combine_paper(bank, [0.5, 0.5])


@pytest.mark.parametrize("method", ["paper", "cat", "svd"])
def test_deterministic(method):
    bank = make_bank(np.random.default_rng(8), 32, 24, [4, 4, 4], MIXED_SCALES)
    a, b = (combine_factors(method, bank, COEFS, rank=5) for _ in range(2))
    assert a.A.tobytes() == b.A.tobytes() and a.B.tobytes() == b.B.tobytes()


@pytest.mark.parametrize(
    "bank_shapes, coefs, match",
    [
        ([((4, 12), (16, 4)), ((4, 10), (16, 4))], [0.5, 0.5], "adapter 1: A has 10 columns"),
        ([((4, 12), (16, 4)), ((4, 12), (15, 4))], [0.5, 0.5], "adapter 1: B has 15 rows"),
        ([((4, 12), (16, 4)), ((3, 12), (16, 4))], [0.5, 0.5], "adapter 1: A has 3 rows but B has 4 columns"),
        ([((4, 12), (16, 4))], [0.5, 0.5], "got 2 coefficients for 1 adapters"),
        ([((4, 12), (16, 4))], [0.0], "at least one coefficient"),
        ([((4, 12), (16, 4)), ((4, 12), (16, 4))], [1.5, -0.5], ">= 0"),
    ],
)
@pytest.mark.parametrize("method", ["paper", "cat", "svd"])
def test_validation(method, bank_shapes, coefs, match):
    bank = [Factors(A=np.ones(a, np.float32), B=np.ones(b, np.float32), scale=1.0) for a, b in bank_shapes]
    with pytest.raises(ValueError, match=match):
        combine_factors(method, bank, coefs, rank=4)


def test_dispatcher_errors():
    bank = make_bank(np.random.default_rng(9), 8, 8, [2])
    with pytest.raises(ValueError, match="needs a rank"):
        combine_factors("svd", bank, [1.0])
    with pytest.raises(ValueError, match="integer >= 1"):
        combine_factors("svd", bank, [1.0], rank=0)
    with pytest.raises(InputError, match="did you mean 'svd'"):
        combine_factors("svdd", bank, [1.0])


# ---- properties -------------------------------------------------------------


@st.composite
def banks(draw, equal_ranks=False):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n = draw(st.integers(1, 4))
    d, k = draw(st.integers(2, 10)), draw(st.integers(2, 10))
    ranks = [draw(st.integers(1, 4))] * n if equal_ranks else [draw(st.integers(1, 4)) for _ in range(n)]
    scales = [draw(st.floats(0.1, 4.0)) for _ in range(n)]
    return make_bank(rng, d, k, ranks, scales)


def coefs_for(n):
    return st.lists(st.floats(0.0, 1.0), min_size=n, max_size=n).filter(lambda c: max(c) > 0.01)


@PROPS
@given(st.data())
def test_cat_is_linear_in_coefficients(data):
    bank = data.draw(banks())
    n = len(bank)
    c1, c2 = data.draw(coefs_for(n)), data.draw(coefs_for(n))
    a, b = data.draw(st.floats(0.1, 3.0)), data.draw(st.floats(0.1, 3.0))
    mixed = combine_cat(bank, [a * x + b * y for x, y in zip(c1, c2)]).delta()
    parts = a * combine_cat(bank, c1).delta() + b * combine_cat(bank, c2).delta()
    assert np.linalg.norm(mixed - parts) <= 1e-5 * (np.linalg.norm(parts) + 1e-12)


@PROPS
@given(st.data())
def test_svd_never_worse_than_paper_at_equal_rank(data):
    bank = data.draw(banks(equal_ranks=True))
    c = data.draw(coefs_for(len(bank)))
    target = exact(bank, c)
    err_svd = np.linalg.norm(combine_svd(bank, c, rank=bank[0].rank).delta() - target)
    err_paper = np.linalg.norm(combine_paper(bank, c).delta() - target)
    assert err_svd <= err_paper + 1e-5 * (np.linalg.norm(target) + 1e-12)


@PROPS
@given(st.data())
def test_zero_coefficient_adapters_do_not_matter(data):
    bank = data.draw(banks(equal_ranks=True))
    c = data.draw(coefs_for(len(bank)))
    d, k = bank[0].B.shape[0], bank[0].A.shape[1]
    extra = make_bank(np.random.default_rng(data.draw(st.integers(0, 1000))), d, k, [data.draw(st.integers(1, 4))])
    pos = data.draw(st.integers(0, len(bank)))
    bigger = bank[:pos] + extra + bank[pos:]
    c_big = c[:pos] + [0.0] + c[pos:]
    for method in ("paper", "cat", "svd"):
        a, b = combine_factors(method, bank, c, rank=3), combine_factors(method, bigger, c_big, rank=3)
        assert a.A.tobytes() == b.A.tobytes() and a.B.tobytes() == b.B.tobytes(), method
