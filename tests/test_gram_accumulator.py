"""GramAccumulator's storage: upper-triangle ``?syrk`` products added in place, a symmetric
``gram`` for readers, merges, and factorizations that may consume the statistic."""

import tracemalloc

import numpy as np
import pytest

from skid import InterpolativeDecomposition, _linalg


def data(n, m, dtype=np.float64, order="C", seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, m // 2 + 1)) @ rng.standard_normal((m // 2 + 1, m))
    return np.asarray(X + 0.1 * rng.standard_normal((n, m)), dtype=dtype, order=order)


def exact_gram(X, exp=0):
    X64 = np.ldexp(np.asarray(X, dtype=np.float64), -exp)
    return X64.T @ X64


def assert_gram(acc, X):
    """``acc.gram`` is ``XᵀX / 4**scale_exp`` to the rounding of its products, symmetric."""
    exact = exact_gram(X, acc.scale_exp)
    tol = 1e-5 if acc.float32_products else 1e-12
    gram = acc.gram
    assert gram.dtype == np.float64
    np.testing.assert_array_equal(gram, gram.T)
    np.testing.assert_allclose(gram, exact, rtol=0, atol=tol * np.abs(exact).max())


@pytest.fixture
def small_blocks(monkeypatch):
    """Row blocks of a few rows, so that one update multiplies several blocks."""
    monkeypatch.setattr(_linalg, "_NATIVE_BLOCK_ROWS", 7)
    monkeypatch.setattr(_linalg, "_BLOCK_ELEMENTS", 7 * 40)


@pytest.mark.parametrize("precision", ["float64", "native"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize("n", [1, 50])
@pytest.mark.parametrize("blocks", ["one", "several"])
def test_products_equal_the_plain_gram(request, precision, dtype, order, n, blocks):
    if blocks == "several":
        request.getfixturevalue("small_blocks")
    X = data(n, 40, dtype, order)
    acc = _linalg.GramAccumulator(precision).update(X)
    assert_gram(acc, X)
    acc.update(X[::-1])  # a second block is added to the statistic
    assert_gram(acc, np.vstack([X, X]))


def test_strided_blocks_take_the_full_product():
    X = data(60, 80)[:, ::2]  # neither C- nor F-contiguous: ?syrk would copy it
    acc = _linalg.GramAccumulator().update(X)
    assert_gram(acc, X)
    acc.update(data(5, 40, seed=1))  # a ?syrk product added to the full one
    acc.update(X[::-1])  # and a full one to the sum
    assert_gram(acc, np.vstack([X, data(5, 40, seed=1), X]))


@pytest.mark.parametrize(
    "scale, dtype, precision",
    [(1e160, np.float64, "float64"), (1e-170, np.float64, "float64"),
     (1e20, np.float32, "native"), (1e-25, np.float32, "native")],
)  # fmt: skip
def test_scaled_blocks(scale, dtype, precision):
    X = (data(30, 20) * scale).astype(dtype)
    acc = _linalg.GramAccumulator(precision).update(X)
    assert acc.scale_exp != 0
    assert_gram(acc, X)
    small = data(10, 20, dtype, seed=1)  # a block at scale 0, added scaled down
    acc.update(small)
    assert_gram(acc, np.vstack([X, small]))


@pytest.mark.parametrize("precision", ["float64", "native"])
def test_a_nan_block_leaves_the_statistic_untouched(small_blocks, precision):
    X = data(40, 40, np.float32)
    acc = _linalg.GramAccumulator(precision).update(X)
    raw, upper = acc._gram.copy(), acc._upper
    bad = data(30, 40, np.float32, seed=1)
    bad[-1, 3] = np.nan  # in the last of several row blocks
    with pytest.raises(_linalg.NonFiniteDataError):
        acc.update(bad)
    np.testing.assert_array_equal(acc._gram, raw)
    assert acc._upper == upper and acc.n_samples == 40 and acc.scale_exp == 0


@pytest.mark.parametrize("precision", ["float64", "native"])
def test_merge_equals_one_accumulator_over_all_rows(precision):
    X, Y = data(50, 30, np.float32), data(40, 30, np.float32, seed=1) * np.float32(1e25)
    whole = _linalg.GramAccumulator(precision).update(np.vstack([X, Y]))
    ours, theirs = _linalg.GramAccumulator(precision), _linalg.GramAccumulator(precision)
    ours.update(X)
    theirs.update(Y)
    kept = theirs._gram.copy()
    ours.merge(theirs)
    np.testing.assert_array_equal(theirs._gram, kept)  # the merged one is not modified
    assert ours.n_samples == 90 and ours.scale_exp == whole.scale_exp
    np.testing.assert_allclose(ours.gram, whole.gram, rtol=1e-6)
    empty = _linalg.GramAccumulator(precision).merge(theirs)  # a copy, upper triangle and all
    assert empty._gram is not theirs._gram and empty._upper
    np.testing.assert_array_equal(empty.gram, theirs.gram)


@pytest.mark.parametrize("order", ["C", "F"])
def test_consume_gives_the_same_factorization_and_empties(order):
    X = data(200, 60, np.float32, order)
    for prepare in (lambda acc: None, lambda acc: acc.gram):  # upper triangle / whole Gram
        acc = _linalg.GramAccumulator("native").update(X * np.float32(1e20))
        prepare(acc)
        kept = acc.factorize()
        consumed = acc.factorize(consume=True)
        assert acc._gram is None and acc.n_samples == 0 and acc.n_features is None
        np.testing.assert_array_equal(consumed.perm, kept.perm)
        np.testing.assert_array_equal(consumed.U, kept.U)
        np.testing.assert_array_equal(consumed.errors, kept.errors)
        assert consumed.trusted_rank == kept.trusted_rank and consumed.float32_products


def test_factorize_gram_reads_one_triangle_in_any_layout():
    X = data(100, 30)
    gram = exact_gram(X) * 2.0**80  # scaled inside
    reference = _linalg.factorize_gram(gram)
    torn = np.triu(gram)
    torn[np.tril_indices(30, -1)] = np.nan
    for candidate, upper in [(torn, True), (np.asfortranarray(torn), True), (gram, False)]:
        for overwrite in (False, True):
            given = candidate.copy(order="K")
            fac = _linalg.factorize_gram(given, upper=upper, overwrite=overwrite)
            np.testing.assert_array_equal(fac.perm, reference.perm)
            np.testing.assert_allclose(fac.U, reference.U, rtol=1e-12, atol=1e-12 * 2.0**40)
            np.testing.assert_allclose(fac.errors, reference.errors, rtol=1e-12, atol=1e-15)
            if not overwrite:
                np.testing.assert_array_equal(given, candidate)
    with pytest.raises(ValueError, match="NaN"):
        _linalg.factorize_gram(torn)  # the NaN triangle is checked unless told it is unread


def test_reading_the_gram_midway_keeps_the_sum_right():
    X = data(90, 25)
    acc = _linalg.GramAccumulator()
    for rows in (slice(0, 30), slice(30, 60), slice(60, 90)):
        acc.update(X[rows])
        acc.factorize()
        assert_gram(acc, X[: rows.stop])  # fills the lower triangle, which later updates skip
    np.testing.assert_allclose(
        acc.factorize().errors, _linalg.GramAccumulator().update(X).factorize().errors,
        rtol=1e-10, atol=1e-13,
    )  # fmt: skip


def test_partial_fit_keeps_accumulating_after_each_factorization():
    X = data(300, 40, np.float32)
    streamed = InterpolativeDecomposition(rank=10, method="gram")
    for start in range(0, 300, 100):
        streamed.partial_fit(X[start : start + 100])
    whole = InterpolativeDecomposition(rank=10, method="gram").partial_fit(X)
    assert streamed.n_samples_seen_ == 300
    np.testing.assert_array_equal(streamed.selected_features_, whole.selected_features_)
    np.testing.assert_allclose(streamed.interpolation_matrix_, whole.interpolation_matrix_,
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("precision", ["float64", "native"])
@pytest.mark.parametrize("order", ["C", "F"])
def test_the_callers_data_are_not_modified(precision, order):
    X = data(80, 30, np.float32, order) * np.float32(1e20)
    kept = X.copy(order="K")
    acc = _linalg.GramAccumulator(precision).update(X)
    acc.update(X)
    acc.factorize(consume=True)
    np.testing.assert_array_equal(X, kept)


def test_an_update_allocates_one_float32_product_not_a_float64_gram():
    m, rows = 512, 256
    X = data(2 * rows, m, np.float32)
    acc = _linalg.GramAccumulator("native").update(X[:rows])
    tracemalloc.start()
    try:
        acc.update(X[rows:])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    product32, gram64 = 4 * m * m, 8 * m * m
    assert peak < product32 + gram64 // 4  # the plain way casts a float64 m × m temporary


def test_consume_factorizes_without_an_m_by_m_copy():
    m = 600
    acc = _linalg.GramAccumulator().update(data(700, m))
    tracemalloc.start()
    try:
        acc.factorize(consume=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * m * m // 2  # column-block masks of the finiteness check


# ------------------------------------------------------------------------------ torch blocks

torch = pytest.importorskip("torch")


@pytest.fixture
def narrow_steps(monkeypatch):
    """Column steps of 8, so that a 40-wide triangle is built from several column blocks."""
    monkeypatch.setattr(_linalg, "_TRIANGLE_STEP", 8)


@pytest.mark.parametrize("precision", ["float64", "native"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("blocks", ["one", "several"])
def test_torch_blocks_build_the_triangle_in_column_blocks(request, narrow_steps, precision,
                                                         dtype, blocks):
    if blocks == "several":
        request.getfixturevalue("small_blocks")
    X = data(50, 40)
    acc = _linalg.GramAccumulator(precision)
    for part in np.array_split(X, 3):
        acc.update(torch.as_tensor(part, dtype=dtype))
    assert acc._upper and isinstance(acc._gram, torch.Tensor)
    assert acc._gram.dtype == torch.float64
    exact = exact_gram(X.astype(np.float32) if dtype == torch.float32 else X)
    gram = acc.gram.numpy()
    np.testing.assert_array_equal(gram, gram.T)
    tol = 1e-5 if acc.float32_products else 1e-12
    np.testing.assert_allclose(gram, exact, rtol=0, atol=tol * np.abs(exact).max())
    numpy_fac = _linalg.GramAccumulator("float64").update(X).factorize()
    fac = acc.factorize(consume=True)
    np.testing.assert_array_equal(fac.perm[:10], numpy_fac.perm[:10])


def test_torch_nan_block_and_scaling_and_merge(small_blocks, narrow_steps):
    X = data(60, 40, np.float32)
    acc = _linalg.GramAccumulator("native").update(torch.as_tensor(X[:30]))
    before = acc._gram.clone()
    bad = torch.as_tensor(X[30:]).clone()
    bad[-1, 3] = float("nan")
    with pytest.raises(_linalg.NonFiniteDataError):
        acc.update(bad)
    assert torch.equal(acc._gram, before)  # untouched
    big = _linalg.GramAccumulator("native").update(torch.as_tensor(X[30:]) * 1e20)
    acc.merge(big)
    expected = exact_gram(np.vstack([X[:30], X[30:].astype(np.float64) * 1e20]),
                          acc.scale_exp)
    np.testing.assert_allclose(acc.gram.numpy(), expected, rtol=0,
                               atol=1e-5 * np.abs(expected).max())
    mixed = _linalg.GramAccumulator("native").update(X[:30]).merge(
        _linalg.GramAccumulator("native").update(torch.as_tensor(X[30:])))
    np.testing.assert_allclose(np.asarray(mixed.gram), exact_gram(X), rtol=0,
                               atol=1e-5 * np.abs(exact_gram(X)).max())
