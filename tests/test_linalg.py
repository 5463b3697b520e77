"""The statistics core: pivoted Cholesky of the Gram and pivoted QR of a streamed R factor."""

import numpy as np
import pytest
import scipy.linalg
from hypothesis import given, settings
from hypothesis import strategies as st

from skid import _linalg


def low_rank(n, m, r, seed=0, noise=0.0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, r)) @ rng.standard_normal((r, m))
    return X + noise * rng.standard_normal((n, m))


def measured_error(X, selected, T):
    return np.linalg.norm(X - X[:, selected] @ T) / np.linalg.norm(X)


ACCUMULATORS = [_linalg.GramAccumulator, _linalg.QRAccumulator]


@pytest.mark.parametrize("Acc", ACCUMULATORS)
def test_error_curve_is_exact_at_every_rank(Acc):
    X = low_rank(300, 40, 40, seed=1)
    fac = Acc().update(X).factorize()
    for k in (1, 5, 17, 39, 40):
        selected, T = fac.select(k)
        assert measured_error(X, selected, T) == pytest.approx(fac.errors[k], rel=1e-6, abs=1e-9)
    assert fac.errors[0] == pytest.approx(1.0)
    assert np.all(np.diff(fac.errors) <= 1e-15)


@pytest.mark.parametrize("Acc", ACCUMULATORS)
def test_same_pivots_as_column_pivoted_qr_of_the_data(Acc):
    X = low_rank(200, 30, 30, seed=2)
    _, _, piv = scipy.linalg.qr(X, pivoting=True, mode="economic")
    fac = Acc().update(X).factorize()
    assert np.array_equal(fac.perm[:20], piv[:20])


@pytest.mark.parametrize("Acc", ACCUMULATORS)
def test_streaming_equals_one_block(Acc):
    X = low_rank(500, 25, 25, seed=3)
    whole = Acc().update(X).factorize()
    acc = Acc()
    for rows in np.array_split(np.arange(500), 7):
        acc.update(X[rows])
    streamed = acc.factorize()
    assert acc.n_samples == 500
    assert np.array_equal(whole.perm, streamed.perm)
    np.testing.assert_allclose(whole.errors, streamed.errors, atol=1e-10)


@pytest.mark.parametrize("Acc", ACCUMULATORS)
def test_merging_partial_statistics_equals_one_block(Acc):
    X = low_rank(400, 20, 20, seed=4)
    whole = Acc().update(X).factorize()
    parts = [Acc().update(X[rows]) for rows in np.array_split(np.arange(400), 3)]
    merged = Acc().merge(Acc())  # empty ones merge to nothing
    for part in parts:
        merged = merged.merge(part).merge(Acc())
    assert merged.n_samples == 400 and merged.n_features == 20
    assert np.array_equal(whole.perm, merged.factorize().perm)
    np.testing.assert_allclose(whole.errors, merged.factorize().errors, atol=1e-10)
    with pytest.raises(ValueError, match="columns"):
        merged.merge(Acc().update(X[:, :5]))


def test_qr_route_recovers_exact_low_rank_to_rounding():
    X = low_rank(400, 50, 7, seed=4)
    fac = _linalg.QRAccumulator().update(X).factorize()
    selected, T = fac.select(7)
    assert measured_error(X, selected, T) < 1e-13
    assert fac.numerical_rank(400 * np.finfo(float).eps) == 7


def test_gram_route_error_floor_is_documented_limit():
    X = low_rank(400, 50, 7, seed=4)
    fac = _linalg.GramAccumulator().update(X).factorize()
    selected, T = fac.select(7)
    assert measured_error(X, selected, T) < 1e-6
    assert fac.trusted_rank >= 7


@pytest.mark.parametrize("Acc", ACCUMULATORS)
def test_rank_beyond_numerical_rank_keeps_identity_and_zero_error(Acc):
    X = low_rank(100, 12, 3, seed=5)
    fac = Acc().update(X).factorize()
    selected, T = fac.select(6)
    np.testing.assert_allclose(T[:, selected], np.eye(6), atol=1e-12)
    assert measured_error(X, selected, T) < 1e-6


@pytest.mark.parametrize("Acc", ACCUMULATORS)
def test_zero_matrix(Acc):
    fac = Acc().update(np.zeros((10, 4))).factorize()
    assert np.all(fac.errors == 0)
    assert fac.rank_for_tol(0.0) == 1
    selected, T = fac.select(1)
    assert T.shape == (1, 4) and T[0, selected[0]] == 1


@pytest.mark.parametrize("Acc", ACCUMULATORS)
def test_non_finite_statistics_raise(Acc):
    X = np.ones((5, 3))
    X[2, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        Acc().update(X).factorize()


@pytest.mark.parametrize("Acc", ACCUMULATORS)
def test_block_with_other_width_raises(Acc):
    acc = Acc().update(np.ones((4, 3)))
    with pytest.raises(ValueError, match="earlier blocks had 3"):
        acc.update(np.ones((4, 5)))


def test_float32_blocks_accumulate_in_float64_without_whole_copy():
    X = low_rank(1000, 16, 16, seed=6).astype(np.float32)
    acc = _linalg.GramAccumulator()
    acc.update(X)
    assert acc.gram.dtype == np.float64
    np.testing.assert_allclose(acc.gram, X.astype(np.float64).T @ X.astype(np.float64))
    assert list(_linalg.row_blocks(10, 3, max_elements=12)) == [
        slice(0, 4), slice(4, 8), slice(8, 10)
    ]


def test_randomized_gives_least_squares_T_for_its_columns():
    X = low_rank(2000, 200, 200, seed=7, noise=0.0)
    rng = np.random.default_rng(0)
    selected, T, error = _linalg.randomized_factorization(X, 20, rng)
    assert measured_error(X, selected, T) == pytest.approx(error, rel=1e-6)
    best_T = np.linalg.lstsq(X[:, selected], X, rcond=None)[0]
    assert error == pytest.approx(measured_error(X, selected, best_T), rel=1e-6)
    np.testing.assert_allclose(T[:, selected], np.eye(20), atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 40),
    m=st.integers(1, 12),
    tol=st.floats(0.0, 0.99),
    seed=st.integers(0, 1000),
)
def test_rank_for_tol_is_the_smallest_rank_meeting_tol(n, m, tol, seed):
    X = np.random.default_rng(seed).standard_normal((n, m))
    fac = _linalg.QRAccumulator().update(X).factorize()
    k = fac.rank_for_tol(tol)
    assert fac.errors[k] <= tol
    assert k == 1 or fac.errors[k - 1] > tol


def test_native_precision_gram_sums_float32_products_in_float64():
    X = low_rank(10_000, 32, 32, seed=8).astype(np.float32)
    exact = X.astype(np.float64).T @ X.astype(np.float64)
    native = _linalg.GramAccumulator("native").update(X).gram
    assert native.dtype == np.float64
    np.testing.assert_allclose(native, exact, rtol=0, atol=1e-6 * np.abs(exact).max())


def test_native_precision_falls_back_to_float64_when_torch_allows_tf32():
    torch = pytest.importorskip("torch")
    X = torch.as_tensor(low_rank(5000, 16, 16, seed=9).astype(np.float32))
    exact = (X.double().T @ X.double()).numpy()
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        gram = _linalg.GramAccumulator("native").update(X).gram.numpy()
    finally:
        torch.set_float32_matmul_precision(previous)
    np.testing.assert_allclose(gram, exact, rtol=1e-12)


@pytest.mark.parametrize("precision", ["float64", "native"])
def test_half_precision_blocks_are_upcast_inside_the_accumulator(precision):
    torch = pytest.importorskip("torch")
    X = torch.as_tensor(low_rank(300, 8, 8, seed=10).astype(np.float32)).to(torch.bfloat16)
    exact = (X.double().T @ X.double()).numpy()
    gram = _linalg.GramAccumulator(precision).update(X).gram.numpy()
    np.testing.assert_allclose(gram, exact, rtol=1e-5, atol=1e-5 * np.abs(exact).max())
