"""The leading pivots of a pivoted Cholesky (a factorization stopped at a fit's width rule)
against LAPACK's whole ``dpstrf``: same pivots, rows, errors, selection and T."""

import numpy as np
import pytest
from scipy.linalg import lapack

from skid import InterpolativeDecomposition, _linalg
from skid._linalg import _leading

M = 200  # past the size where the loop takes over from LAPACK


def _data(kind, n=400, m=M, seed=0):
    rng = np.random.default_rng(seed)
    if kind == "random":
        return rng.standard_normal((n, m)) * rng.uniform(0.1, 3.0, m)
    if kind == "rank-deficient":  # rank 30: pivots past it hit LAPACK's cutoff
        return rng.standard_normal((n, 30)) @ rng.standard_normal((30, m))
    if kind == "duplicated":  # exact ties: every column four times
        return np.repeat(rng.standard_normal((n, m // 4)), 4, axis=1)
    if kind == "orthogonal":  # equal norms, no correlation: every pivot a tie
        return np.eye(m)[:, rng.permutation(m)]
    raise ValueError(kind)


KINDS = ["random", "rank-deficient", "duplicated", "orthogonal"]


def _dpstrf(G):
    factor, piv, rank, _ = lapack.dpstrf(np.asfortranarray(G), tol=-1.0)
    return piv - 1, np.triu(factor), rank


def _assert_same_errors(errors, expected):
    """Equal to rounding; below ``GRAM_RELIABLE_ERROR`` both are the Gram's rounding."""
    floor = _linalg.GRAM_RELIABLE_ERROR
    resolved = expected > floor
    np.testing.assert_allclose(errors[resolved], expected[resolved], rtol=1e-10, atol=1e-13)
    assert np.all(errors[~resolved] <= floor)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [1, 17, 64])
def test_leading_pivots_are_dpstrfs(kind, k):
    G = _data(kind).T @ _data(kind)
    perm, U, row_sq, stop = _leading.leading_pivots(
        G, k, M * np.finfo(np.float64).epsneg * G.diagonal().max(), float(np.trace(G))
    )
    lapack_perm, lapack_U, rank = _dpstrf(G)
    j = U.shape[0]
    assert j == min(k, rank)
    assert stop == ("cutoff" if rank < k else "pivots")
    np.testing.assert_array_equal(perm[:j], lapack_perm[:j])
    if stop == "cutoff":  # stopped where LAPACK stops: the whole order is LAPACK's
        np.testing.assert_array_equal(perm, lapack_perm)
    # rows in pivot order, as LAPACK's (the columns past j in LAPACK's order then)
    order = np.argsort(perm)[lapack_perm]
    scale = np.sqrt(G.diagonal().max())
    np.testing.assert_allclose(U[:, order], lapack_U[:j], rtol=0, atol=1e-12 * scale)
    assert np.all(np.tril(U[:, :j], -1) == 0)
    np.testing.assert_allclose(row_sq, np.einsum("ij,ij->i", U, U))


def _whole_and_early(kind, **rule):
    """The whole factorization of the kind's Gram, and the one stopped at ``rule``."""
    X = _data(kind)
    G = X.T @ X
    return (_linalg.factorize_gram(G, X.shape[0]),
            _linalg.factorize_gram(G, X.shape[0], **rule))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rank", [5, 50, 100])
def test_rank_rule_gives_the_whole_factorizations_selection_T_and_errors(kind, rank):
    whole, early = _whole_and_early(kind, rank=rank)
    partial = rank <= _leading.early_pivot_limit(M) and rank <= whole.trusted_rank
    assert early.complete == (not partial)  # the cutoff, or LAPACK past the loop's limit
    assert early.trusted_rank == (rank if partial else whole.trusted_rank)
    selected, T = early.select(rank)
    expected_selected, expected_T = whole.select(rank)
    np.testing.assert_array_equal(selected, expected_selected)
    np.testing.assert_allclose(T, expected_T, rtol=0, atol=1e-9)
    _assert_same_errors(early.errors[: rank + 1], whole.errors[: rank + 1])
    if not early.complete:
        assert np.isnan(early.errors[rank + 1 :]).all()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tol", [0.9, 0.5, 0.2])
def test_error_tail_rule_stops_at_the_width_for_tol(kind, tol):
    whole, early = _whole_and_early(kind, tol=tol)
    k = whole.rank_for_tol(tol)
    assert early.rank_for_tol(tol) == k
    assert early.errors[k] <= tol and (k == 1 or early.errors[k - 1] > tol)
    if not early.complete:  # stopped at the first width within tol
        assert early.trusted_rank == k
        assert np.isnan(early.errors[k + 1 :]).all()
    _assert_same_errors(early.errors[: k + 1], whole.errors[: k + 1])
    selected, T = early.select(k)
    np.testing.assert_array_equal(selected, whole.select(k)[0])
    np.testing.assert_allclose(T, whole.select(k)[1], rtol=0, atol=1e-9)


@pytest.mark.parametrize("kind", ["random", "orthogonal"])  # full rank: past the limit
@pytest.mark.parametrize("rule", [{"rank": 120}, {"tol": 0.05}, {"tol": 1e-9}])
def test_past_the_loops_limit_lapack_finishes_with_the_same_pivots(kind, rule):
    X = _data(kind)
    G = X.T @ X
    whole = _linalg.factorize_gram(G, X.shape[0])
    fac = _linalg.factorize_gram(G, X.shape[0], **rule)
    assert fac.complete and fac.trusted_rank == whole.trusted_rank
    np.testing.assert_array_equal(fac.perm[: fac.trusted_rank], whole.perm[: fac.trusted_rank])
    _assert_same_errors(fac.errors, whole.errors)
    scale = np.sqrt(G.diagonal().max())
    np.testing.assert_allclose(fac.U[:, : fac.trusted_rank], whole.U[:, : fac.trusted_rank],
                               rtol=0, atol=1e-10 * scale)


@pytest.mark.parametrize("step", [7, 256])  # the rest's block gathered in strips of rows
@pytest.mark.parametrize("order", ["C", "F"])  # an overwritten Gram in either memory order
def test_the_rest_is_gathered_from_either_storage_in_strips(monkeypatch, step, order):
    from skid._linalg import _blocking

    monkeypatch.setattr(_blocking, "TRIANGLE_STEP", step)
    X = _data("random")
    G = X.T @ X
    whole = _linalg.factorize_gram(G, X.shape[0])
    G[np.tril_indices(M, -1)] = np.nan  # only the upper triangle may be read
    fac = _linalg.factorize_gram(np.array(G, order=order), X.shape[0], upper=True,
                                 overwrite=True, tol=1e-9)
    assert fac.complete and fac.trusted_rank == whole.trusted_rank
    np.testing.assert_array_equal(fac.perm, whole.perm)
    _assert_same_errors(fac.errors, whole.errors)


def test_a_partial_factorization_refuses_what_needs_more_pivots():
    X = _data("random")
    fac = _linalg.factorize_gram(X.T @ X, rank=10)
    assert not fac.complete and fac.U.shape == (10, M)
    for call in (lambda: fac.select(11), fac.gram, lambda: fac.numerical_rank(1e-8),
                 lambda: fac.rank_for_tol(1e-6)):
        with pytest.raises(ValueError, match="stopped after 10 pivots"):
            call()


def test_the_whole_factorization_where_the_loop_does_not_pay_or_cannot_finish():
    X = _data("random")
    G = X.T @ X
    assert _linalg.factorize_gram(G, rank=_leading.early_pivot_limit(M) + 1).complete
    assert _linalg.factorize_gram(G, n_samples=20, rank=30).complete  # fewer rows than pivots
    assert _linalg.factorize_gram(G, tol=1e-9).complete  # needs every pivot
    small = _data("random", m=32)
    assert _linalg.factorize_gram(small.T @ small, rank=4).complete  # LAPACK is cheaper


@pytest.mark.parametrize("scale", [1e-150, 1e150])
def test_extreme_magnitudes_give_the_unscaled_result(scale):
    X = _data("random")
    acc = _linalg.GramAccumulator().update(X * scale)
    whole, early = acc.factorize(), acc.factorize(rank=40)
    columns = np.argsort(early.perm), np.argsort(whole.perm)  # U in the original order
    np.testing.assert_allclose(early.U[:, columns[0]], whole.U[:40, columns[1]],
                               rtol=0, atol=1e-12 * np.abs(whole.U).max())
    assert early.sq_norm == pytest.approx(whole.sq_norm, rel=1e-12)
    np.testing.assert_array_equal(early.select(40)[0], whole.select(40)[0])


@pytest.mark.parametrize("params", [{"rank": 50}, {"rank": 0.3}, {"tol": 0.3}])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_fit_selects_as_with_the_whole_factorization(monkeypatch, params, dtype):
    X = _data("random").astype(dtype)
    fast = InterpolativeDecomposition(**params).fit(X)
    monkeypatch.setattr(_leading, "_SMALL_M", 10**9)  # dpstrf always
    whole = InterpolativeDecomposition(**params).fit(X)
    np.testing.assert_array_equal(fast.selected_features_, whole.selected_features_)
    np.testing.assert_allclose(fast.interpolation_matrix_, whole.interpolation_matrix_,
                               rtol=0, atol=1e-5 if dtype == np.float32 else 1e-9)
    assert fast.error_ == pytest.approx(whole.error_, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize("tol", [None, 0.3])
def test_whole_lines_of_a_symmetric_gram_give_the_same_bits(kind, order, tol):
    X = _data(kind)
    G = X.T @ X
    cutoff, sq_norm = M * np.finfo(np.float64).epsneg * G.diagonal().max(), float(np.trace(G))
    torn = np.triu(G)
    torn[np.tril_indices(M, -1)] = np.nan  # the upper triangle's reads must not touch these
    expected = _leading.leading_pivots(np.array(torn, order=order), 64, cutoff, sq_norm, tol)
    got = _leading.leading_pivots(np.array(G, order=order), 64, cutoff, sq_norm, tol,
                                  symmetric=True)
    for ours, theirs in zip(got[:3], expected[:3], strict=True):
        np.testing.assert_array_equal(ours, theirs)
    assert got[3] == expected[3]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rule", [{"rank": 1}, {"rank": 40}, {"rank": 120}, {"tol": 0.3},
                                  {"tol": 1e-9}, {}])
def test_a_one_panel_statistic_is_factorized_in_place_as_a_copy_would_be(kind, rule):
    X = _data(kind)  # 200 columns: one panel, the whole symmetric Gram
    acc = _linalg.GramAccumulator().update(X)
    before = acc.gram
    fac = acc.factorize(**rule)
    copy = np.asfortranarray(np.triu(before))  # the multi-panel way: an F copy, one triangle
    expected = _linalg.factorize_gram(copy, X.shape[0], upper=True, overwrite=True, **rule)
    for name in ("perm", "U", "errors"):
        np.testing.assert_array_equal(getattr(fac, name), getattr(expected, name))
    assert (fac.trusted_rank, fac.complete) == (expected.trusted_rank, expected.complete)
    np.testing.assert_array_equal(acc.gram, before)  # read, not written


def test_the_leading_pivots_copy_no_m_by_m_array():
    import tracemalloc

    X = _data("random")
    acc = _linalg.GramAccumulator().update(X)
    tracemalloc.start()
    try:
        acc.factorize(rank=40)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * M * M // 2  # the rows and T's temporaries, no copy of the Gram


@pytest.mark.parametrize("power", [-400, -12, 0, 12, 400])  # 4**power: inside 2**±900
@pytest.mark.parametrize("rule", [{"rank": 40}, {"tol": 0.3}, {"rank": 120}, {}])
def test_an_unscaled_gram_gives_the_scaled_ones_bits(power, rule):
    X = _data("random")
    G = X.T @ X
    G /= 2.0 ** _linalg._blocking.binary_exponent(G.diagonal().max())  # as if scaled
    reference = _linalg.factorize_gram(G, X.shape[0], **rule)
    fac = _linalg.factorize_gram(G * 4.0**power, X.shape[0], **rule)
    np.testing.assert_array_equal(fac.perm, reference.perm)
    np.testing.assert_array_equal(fac.errors, reference.errors)
    np.testing.assert_array_equal(fac.U, reference.U * 2.0**power)
    k = fac.trusted_rank
    np.testing.assert_array_equal(fac.select(k)[1], reference.select(k)[1])
