"""GramAccumulator's storage: the upper triangle in column panels, each panel's product added
in place, a symmetric ``gram`` for readers, the packed triangle data-parallel ranks sum, merges,
and factorizations that may consume the statistic."""

import tracemalloc
import weakref

import numpy as np
import pytest

from skid import InterpolativeDecomposition, _array, _linalg
from skid._linalg import _blocking, _gram


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


def panels(acc):
    """Copies of the stored panels (NumPy or CPU torch)."""
    return [p.clone() if hasattr(p, "clone") else p.copy() for p in acc._panels]


def assert_same_panels(acc, kept):
    """Bit for bit."""
    assert len(acc._panels) == len(kept)
    for panel, before in zip(acc._panels, kept, strict=True):
        np.testing.assert_array_equal(np.asarray(panel), np.asarray(before))


@pytest.fixture
def small_blocks(monkeypatch):
    """Row blocks of a few rows, so that one update multiplies several blocks."""
    monkeypatch.setattr(_blocking, "NATIVE_BLOCK_ROWS", 7)
    monkeypatch.setattr(_blocking, "NATIVE_VIEW_ROWS", 7)
    monkeypatch.setattr(_blocking, "BLOCK_ELEMENTS", 7 * 40)


@pytest.fixture(params=["whole", "panels"])
def products(request):
    """Both ways an update multiplies a block (``"auto"`` picks one by the buffer's size)."""
    return request.param


@pytest.fixture
def narrow_steps(monkeypatch):
    """Panels 8 columns wide, so that a 40-wide triangle is stored in several panels."""
    monkeypatch.setattr(_blocking, "TRIANGLE_STEP", 8)


@pytest.mark.parametrize("precision", ["float64", "native"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize("n", [1, 50])
@pytest.mark.parametrize("blocks", ["one", "several"])
def test_products_equal_the_plain_gram(request, precision, dtype, order, n, blocks, products):
    if blocks == "several":
        request.getfixturevalue("small_blocks")
    X = data(n, 40, dtype, order)
    acc = _linalg.GramAccumulator(precision, products).update(X)
    assert_gram(acc, X)
    acc.update(X[::-1])  # a second block is added to the statistic
    assert_gram(acc, np.vstack([X, X]))


def test_strided_blocks(products):
    X = data(60, 80)[:, ::2]  # BLAS cannot read it in place: copied a row block at a time
    acc = _linalg.GramAccumulator("float64", products).update(X)
    assert_gram(acc, X)
    acc.update(data(5, 40, seed=1))  # a contiguous block added to the sum
    acc.update(X[::-1])  # negative strides, copied too
    assert_gram(acc, np.vstack([X, data(5, 40, seed=1), X]))


@pytest.mark.parametrize(
    "scale, dtype, precision",
    [(1e160, np.float64, "float64"), (1e-170, np.float64, "float64"),
     (1e20, np.float32, "native"), (1e-25, np.float32, "native")],
)  # fmt: skip
def test_scaled_blocks(scale, dtype, precision, products):
    X = (data(30, 20) * scale).astype(dtype)
    acc = _linalg.GramAccumulator(precision, products).update(X)
    assert acc.scale_exp != 0
    assert_gram(acc, X)
    small = data(10, 20, dtype, seed=1)  # a block at scale 0, added scaled down
    acc.update(small)
    assert_gram(acc, np.vstack([X, small]))


@pytest.mark.parametrize("precision", ["float64", "native"])
@pytest.mark.parametrize("bad_value", [np.nan, np.inf])
def test_a_bad_row_block_leaves_the_statistic_bit_identical(small_blocks, narrow_steps,
                                                            precision, bad_value, products):
    X = data(40, 40, np.float32)
    acc = _linalg.GramAccumulator(precision, products).update(X)
    kept = panels(acc)
    bad = data(30, 40, np.float32, seed=1)
    bad[-1, 3] = bad_value  # in the last of several row blocks: the first ones are fine
    with pytest.raises(_linalg.NonFiniteDataError):
        acc.update(bad)
    assert_same_panels(acc, kept)
    assert acc.n_samples == 40 and acc.scale_exp == 0


@pytest.mark.parametrize("precision", ["float64", "native"])
@pytest.mark.parametrize("bad_value", [np.nan, np.inf])
def test_a_bad_late_block_leaves_a_new_statistic_empty(small_blocks, precision, bad_value,
                                                       products):
    bad = data(30, 40, np.float32, seed=1)
    bad[-1, 3] = bad_value  # the first blocks were added before this one was multiplied
    acc = _linalg.GramAccumulator(precision, products)
    with pytest.raises(_linalg.NonFiniteDataError):
        acc.update(bad)
    assert acc._panels is None and acc.n_samples == 0 and acc.nbytes == 0
    acc.update(bad[:20])  # and it accumulates as new
    assert_gram(acc, bad[:20])


def test_a_late_block_near_overflow_rescales_all_the_rows(small_blocks, products):
    X = data(30, 40, np.float32)
    X[-5:] *= np.float32(1e20)  # only the last block's squares leave float32's safe range
    acc = _linalg.GramAccumulator("native", products).update(X)
    assert acc.scale_exp != 0 and acc.n_samples == 30
    assert_gram(acc, X)


def test_a_tiny_block_into_a_statistic_is_scaled_once(products):
    X, tiny = data(30, 20) * 1e-170, data(10, 20, seed=1) * 1e-170
    acc = _linalg.GramAccumulator("float64", products).update(X)
    scale_exp = acc.scale_exp
    acc.update(tiny)  # its squares underflow unscaled: checked, scaled, then added
    assert acc.scale_exp == scale_exp != 0
    assert_gram(acc, np.vstack([X, tiny]))


@pytest.mark.parametrize("precision", ["float64", "native"])
def test_whole_products_check_blocks_without_a_pass_before_them(monkeypatch, precision):
    X = data(50, 40, np.float32)

    def no_pass(block):
        raise AssertionError("a pass over the block before its product")

    monkeypatch.setattr(_linalg._array, "max_column_sq_sum", no_pass)
    acc = _linalg.GramAccumulator(precision).update(X).update(X[:7])  # "auto": whole at m = 40
    assert_gram(acc, np.vstack([X, X[:7]]))
    with pytest.raises(AssertionError, match="a pass"):
        _linalg.GramAccumulator(precision, "panels").update(X)


@pytest.mark.parametrize("m, kind, whole", [(1448, "numpy", True), (1449, "numpy", False),
                                            (1400, "torch", True), (2048, "torch", False)])
def test_auto_multiplies_whole_up_to_the_buffer_limit(m, kind, whole):
    X = np.zeros((2, m), np.float32) if kind == "numpy" else torch.zeros(2, m)
    assert _gram._whole_products(X, "float32", "auto") == whole
    assert _gram._whole_products(X, "float32", "whole") and not _gram._whole_products(
        X, "float32", "panels")
    with pytest.raises(ValueError, match="'auto', 'whole' or 'panels'"):
        _gram._whole_products(X, "float32", "fast")


@pytest.mark.parametrize("precision", ["float64", "native"])
def test_merge_equals_one_accumulator_over_all_rows(precision):
    X, Y = data(50, 30, np.float32), data(40, 30, np.float32, seed=1) * np.float32(1e25)
    whole = _linalg.GramAccumulator(precision).update(np.vstack([X, Y]))
    ours, theirs = _linalg.GramAccumulator(precision), _linalg.GramAccumulator(precision)
    ours.update(X)
    theirs.update(Y)
    kept = panels(theirs)
    ours.merge(theirs)
    assert_same_panels(theirs, kept)  # the merged one is not modified
    assert ours.n_samples == 90 and ours.scale_exp == whole.scale_exp
    np.testing.assert_allclose(ours.gram, whole.gram, rtol=1e-6)
    empty = _linalg.GramAccumulator(precision).merge(theirs)  # a copy, panel by panel
    assert not any(np.shares_memory(a, b) for a in empty._panels for b in theirs._panels)
    np.testing.assert_array_equal(empty.gram, theirs.gram)
    with pytest.raises(ValueError, match="31 columns"):
        ours.merge(_linalg.GramAccumulator(precision).update(data(5, 31)))


@pytest.mark.parametrize("order", ["C", "F"])
def test_consume_gives_the_same_factorization_and_empties(narrow_steps, order):
    X = data(200, 60, np.float32, order)
    acc = _linalg.GramAccumulator("native").update(X * np.float32(1e20))
    gram, scale_exp = acc.gram, acc.scale_exp  # reading the Gram changes nothing
    kept = acc.factorize()
    np.testing.assert_array_equal(acc.gram, gram)
    consumed = acc.factorize(consume=True)
    assert acc._panels is None and acc.n_samples == 0 and acc.n_features is None
    np.testing.assert_array_equal(consumed.perm, kept.perm)
    np.testing.assert_array_equal(consumed.U, kept.U)
    np.testing.assert_array_equal(consumed.errors, kept.errors)
    assert consumed.trusted_rank == kept.trusted_rank and consumed.float32_products
    # the symmetric Gram holds the triangle that was factorized, exactly
    reference = _linalg.factorize_gram(gram, 200, float(np.finfo(np.float32).eps),
                                       scale_exp=scale_exp)
    np.testing.assert_array_equal(reference.perm, kept.perm)
    np.testing.assert_array_equal(reference.U, kept.U)


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
            # the tail errors are differences of near-equal sums: compare on the scale of
            # the largest (layouts round differently in the last bits)
            np.testing.assert_allclose(fac.errors, reference.errors, rtol=1e-12,
                                       atol=1e-12 * reference.errors.max())
            if not overwrite:
                np.testing.assert_array_equal(given, candidate)
    with pytest.raises(ValueError, match="NaN"):
        _linalg.factorize_gram(torn)  # the NaN triangle is checked unless told it is unread


@pytest.mark.parametrize("scale", [1.0, 2.0**990])  # 2**990: divided by a power of two first
@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("layout", ["C", "F", "F symmetric", "strided"])
def test_lapack_factorizes_the_columns_form_in_every_layout(monkeypatch, layout, overwrite,
                                                             scale):
    # dpstrf on a Fortran-ordered upper triangle walks rows across the columns (1.7x slower
    # at m = 1,536): every layout reaches it as the lower triangle of a Fortran-ordered array
    from skid._linalg import _cholesky

    seen, dpstrf = [], _cholesky.dpstrf

    def spy(a, lower, tol):
        seen.append((a.flags.f_contiguous, lower))
        return dpstrf(a, lower, tol)

    monkeypatch.setattr(_cholesky, "dpstrf", spy)
    m = 300
    gram = exact_gram(data(400, m)) * scale
    assert (_cholesky._shift(float(gram.diagonal().max())) != 0) == (scale != 1.0)
    reference = _linalg.factorize_gram(gram.copy())
    given = {"C": np.triu(gram), "F": np.asfortranarray(np.triu(gram)),
             "F symmetric": np.asfortranarray(gram),
             "strided": np.kron(np.triu(gram), np.ones((2, 2)))[::2, ::2]}[layout]
    before = given.copy(order="K")
    fac = _linalg.factorize_gram(given, overwrite=overwrite, upper=True,
                                 symmetric=layout == "F symmetric")
    assert seen[-1] == (True, True)
    np.testing.assert_array_equal(fac.perm, reference.perm)
    np.testing.assert_allclose(fac.U, reference.U, rtol=1e-12, atol=1e-12 * np.abs(gram).max())
    if not overwrite or layout == "strided":
        np.testing.assert_array_equal(given, before)
    if overwrite and layout != "strided":  # in place: no m × m copy of its own
        assert traced_peak(lambda: _linalg.factorize_gram(
            before.copy(order="K"), overwrite=True, upper=True)) < 8 * m * m * 1.5
    # the accumulator's statistic, one panel or several, reaches it the same way
    for width in (200, m):
        _linalg.GramAccumulator().update(data(400, width)).factorize(consume=overwrite)
        assert seen[-1] == (True, True)


def test_the_upper_triangle_mirrored_in_place_is_the_symmetric_matrix():
    from skid._linalg._cholesky import mirror_upper

    for m in (1, 5, _blocking.MIRROR_STEP, 2 * _blocking.MIRROR_STEP + 3):
        full = exact_gram(data(m + 3, m))
        for order in "CF":
            torn = np.array(np.triu(full), order=order)
            torn[np.tril_indices(m, -1)] = np.nan
            np.testing.assert_array_equal(mirror_upper(torn), full)


def test_reading_the_gram_midway_keeps_the_sum_right(narrow_steps):
    X = data(90, 25)
    acc = _linalg.GramAccumulator()
    for rows in (slice(0, 30), slice(30, 60), slice(60, 90)):
        acc.update(X[rows])
        acc.factorize()
        assert_gram(acc, X[: rows.stop])
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


def traced_peak(fn) -> int:
    """Bytes ``fn`` allocates at its peak, above what was allocated before (NumPy's buffers
    are traced)."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("m", [40, 512, 600])
def test_the_statistic_stores_the_triangle_in_panels(m):
    step = _linalg.TRIANGLE_STEP
    acc = _linalg.GramAccumulator("native").update(data(30, m, np.float32))
    stored = sum(w * stop for start, stop in _gram._panel_bounds(m) for w in [stop - start])
    assert acc.nbytes == 8 * stored == sum(p.nbytes for p in acc._panels)
    if m % step == 0:
        assert acc.nbytes == 8 * m * (m + step) // 2  # 0.75 m² for m = 2 · 256, not m²
    assert all(p.dtype == np.float64 and p.T.flags.f_contiguous for p in acc._panels)
    assert _linalg.GramAccumulator().nbytes == 0


@pytest.mark.parametrize("precision, dtype", [("native", np.float32), ("float64", np.float64)])
def test_an_update_allocates_one_panel_product_not_an_m_by_m_one(precision, dtype):
    m, rows = 2048, 256
    X = data(2 * rows, m, dtype)
    acc = _linalg.GramAccumulator(precision).update(X[:rows])
    peak = traced_peak(lambda: acc.update(X[rows:]))
    panel_product = np.dtype(dtype).itemsize * m * _linalg.TRIANGLE_STEP  # 2 or 4 MiB
    assert peak < panel_product + (1 << 20)  # an m × m float32 product alone is 16 MiB
    assert_gram(acc, X)


@pytest.mark.parametrize("m", [1, 40, 300])
def test_the_packed_triangle_is_lapacks_and_reads_back(m):
    X = data(50, m) * 1e200  # scaled: the triangle is of XᵀX / 4**scale_exp
    acc = _linalg.GramAccumulator().update(X)
    packed, gram = acc.triangle(), acc.gram
    assert packed.shape == (_linalg.triangle_size(m),) == (m * (m + 1) // 2,)
    np.testing.assert_array_equal(packed, gram.T[np.tril_indices(m)])  # column j's rows 0..j
    back = _linalg.GramAccumulator().set_triangle(packed / 4, m, scale_exp=acc.scale_exp + 1)
    np.testing.assert_array_equal(back.gram, gram / 4)
    assert back.n_features == m and back.nbytes == acc.nbytes
    back.n_samples = acc.n_samples  # (the ranks sum theirs apart)
    np.testing.assert_array_equal(back.factorize().U, acc.factorize().U)
    with pytest.raises(ValueError, match="entries"):
        back.set_triangle(packed[1:], m)
    assert _linalg.GramAccumulator().triangle() is None


def test_a_new_one_panel_statistic_is_its_first_products_array():
    m = 200  # one panel
    X = data(3 * m, m)
    acc = _linalg.GramAccumulator()
    peak = traced_peak(lambda: acc.update(X[:m]))
    assert peak < 8 * m * m * 3 // 2  # the product's m × m array: no zeros to add it to
    assert acc.nbytes == 8 * m * m
    assert_gram(acc, X[:m])
    acc.update(X[m:])  # and it goes on accumulating
    assert_gram(acc, X)


@pytest.mark.parametrize("rule", [{"rank": 30}, {"tol": 0.2}, {}])
def test_a_summed_triangle_is_read_as_the_products_and_checked_whole(rule):
    m = 200  # one panel, read as a symmetric m × m array
    acc = _linalg.GramAccumulator().update(data(300, m))
    back = _linalg.GramAccumulator().set_triangle(acc.triangle(), m, acc.scale_exp)
    back.n_samples = acc.n_samples
    ours, theirs = back.factorize(**rule), acc.factorize(**rule)
    for name in ("perm", "U", "errors"):
        np.testing.assert_array_equal(getattr(ours, name), getattr(theirs, name))
    packed = acc.triangle()
    packed[1] = np.nan  # G[0, 1]: off the diagonal, which is all a checked statistic shows
    bad = _linalg.GramAccumulator().set_triangle(packed, m)
    with pytest.raises(ValueError, match="NaN"):
        bad.factorize(**rule)


@pytest.mark.parametrize("consume", [False, True])
def test_factorize_copies_the_triangle_once_and_consume_frees_as_it_goes(monkeypatch,
                                                                          consume):
    m = 600
    acc = _linalg.GramAccumulator().update(data(700, m))
    n_panels = len(acc._panels)
    alive, refs, to_numpy = [], [weakref.ref(p) for p in acc._panels], _linalg._array.to_numpy

    def copied(panel):  # how many panels are alive as each one is copied
        alive.append(sum(ref() is not None for ref in refs))
        return to_numpy(panel)

    monkeypatch.setattr(_linalg._array, "to_numpy", copied)
    peak = traced_peak(lambda: acc.factorize(consume=consume))
    assert peak < 8 * m * m + 8 * m * _linalg.TRIANGLE_STEP + (1 << 20)  # the m × m copy
    expected = [n_panels - p for p in range(n_panels)] if consume else [n_panels] * n_panels
    assert alive == expected
    assert (acc._panels is None) == consume


# ------------------------------------------------------------------------------ torch blocks

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("precision", ["float64", "native"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("blocks", ["one", "several"])
def test_torch_blocks_build_the_triangle_in_column_panels(request, narrow_steps, precision,
                                                          dtype, blocks, products):
    if blocks == "several":
        request.getfixturevalue("small_blocks")
    X = data(50, 40)
    acc = _linalg.GramAccumulator(precision, products)
    for part in np.array_split(X, 3):
        acc.update(torch.as_tensor(part, dtype=dtype))
    assert all(isinstance(p, torch.Tensor) and p.dtype == torch.float64 for p in acc._panels)
    assert acc.nbytes == 8 * 40 * (40 + 8) // 2
    exact = exact_gram(X.astype(np.float32) if dtype == torch.float32 else X)
    gram = acc.gram.numpy()
    np.testing.assert_array_equal(gram, gram.T)
    tol = 1e-5 if acc.float32_products else 1e-12
    np.testing.assert_allclose(gram, exact, rtol=0, atol=tol * np.abs(exact).max())
    numpy_fac = _linalg.GramAccumulator("float64").update(X).factorize()
    fac = acc.factorize(consume=True)
    np.testing.assert_array_equal(fac.perm[:10], numpy_fac.perm[:10])


def test_torch_tensors_that_require_grad():
    X = torch.as_tensor(data(30, 20, np.float32)).requires_grad_()
    for precision in ("native", "float64"):
        gram = _linalg.GramAccumulator(precision).update(X).gram
        assert not gram.requires_grad
        exact = exact_gram(X.detach().numpy())
        np.testing.assert_allclose(gram.numpy(), exact, rtol=0, atol=1e-5 * np.abs(exact).max())


def test_torch_nan_block_and_scaling_and_merge(small_blocks, narrow_steps, products):
    X = data(60, 40, np.float32)
    acc = _linalg.GramAccumulator("native", products).update(torch.as_tensor(X[:30]))
    before = panels(acc)
    bad = torch.as_tensor(X[30:]).clone()
    bad[-1, 3] = float("nan")
    with pytest.raises(_linalg.NonFiniteDataError):
        acc.update(bad)
    assert_same_panels(acc, before)  # untouched
    big = _linalg.GramAccumulator("native", products).update(torch.as_tensor(X[30:]) * 1e20)
    acc.merge(big)
    expected = exact_gram(np.vstack([X[:30], X[30:].astype(np.float64) * 1e20]),
                          acc.scale_exp)
    np.testing.assert_allclose(acc.gram.numpy(), expected, rtol=0,
                               atol=1e-5 * np.abs(expected).max())
    mixed = _linalg.GramAccumulator("native", products).update(X[:30]).merge(
        _linalg.GramAccumulator("native", products).update(torch.as_tensor(X[30:])))
    np.testing.assert_allclose(np.asarray(mixed.gram), exact_gram(X), rtol=0,
                               atol=1e-5 * np.abs(exact_gram(X)).max())
    packed = torch.as_tensor(mixed.triangle())  # as the ranks' all-reduce hands it back
    reduced = _linalg.GramAccumulator("float64", products).set_triangle(packed, 40)
    assert all(isinstance(p, torch.Tensor) for p in reduced._panels)
    np.testing.assert_array_equal(reduced.gram.numpy(), mixed.gram)
    reduced.update(X[:5])  # NumPy rows into a torch statistic
    np.testing.assert_allclose(reduced.gram.numpy(), exact_gram(np.vstack([X, X[:5]])),
                               rtol=0, atol=1e-5 * np.abs(exact_gram(X)).max())


def test_float32_read_in_place_takes_longer_equal_blocks(monkeypatch):
    monkeypatch.setattr(_blocking, "NATIVE_VIEW_ROWS", 100)
    monkeypatch.setattr(_blocking, "NATIVE_BLOCK_ROWS", 50)
    X = np.random.default_rng(0).standard_normal((250, 8)).astype(np.float32)
    lengths = [rows.stop - rows.start for rows in _gram._gram_slices(X, "float32", 0)]
    assert lengths == [84, 84, 82]  # no copy: up to NATIVE_VIEW_ROWS, in equal parts
    for copied in (X.astype(np.float16), X[:, ::2]):  # upcast, or not readable in place
        assert len(_gram._gram_slices(copied, "float32", 0)) == 5
    assert len(_gram._gram_slices(X, "float32", 3)) == 5  # scaled: a copy per block
    blocks = [X[rows].T @ X[rows] for rows in _gram._gram_slices(X, "float32", 0)]
    expected = sum(block.astype(np.float64) for block in blocks)  # float32 products, float64 sum
    np.testing.assert_array_equal(_linalg.GramAccumulator("native").update(X).gram, expected)


@pytest.mark.parametrize("m, steps", [(200, None), (300, None), (40, 3), (40, 16),
                                      (600, 16)])
@pytest.mark.parametrize("precision", ["float64", "native"])
def test_torch_cpu_products_in_short_steps_leave_out_the_squares_other_triangle(
        monkeypatch, m, steps, precision):
    """Torch on the CPU multiplies each panel's square in steps of rows, each only up to its
    own last column (the rows left of it in one product): the squares' other triangle is
    left out (zeros), never read; the Gram, the packed triangle and the factorization are
    the panel products' ones."""
    torch.set_num_threads(2)  # one thread takes NumPy's BLAS (the autouse fixture restores)
    if steps is not None:
        monkeypatch.setattr(_blocking, "product_step", lambda m: steps)
    X = data(90, m)
    block = torch.as_tensor(X)
    _, parts, symmetric = _gram._whole_product(block, None)
    assert not symmetric
    square = parts[0][:, : parts[0].shape[0]].numpy()
    assert (np.triu(square, 1) == 0).any()  # the part no step reached
    np.testing.assert_allclose(np.tril(square), np.tril(exact_gram(X)[: square.shape[0],
                                                                      : square.shape[0]]),
                               rtol=1e-12, atol=1e-12 * np.abs(square).max())
    acc = _linalg.GramAccumulator(precision)
    for part in np.array_split(X, 3):
        acc.update(torch.as_tensor(part))
    gram = acc.gram.numpy()
    np.testing.assert_array_equal(gram, gram.T)
    np.testing.assert_allclose(gram, exact_gram(X), rtol=0,
                               atol=1e-12 * np.abs(exact_gram(X)).max())
    np.testing.assert_array_equal(acc.host_gram(), gram)  # NumPy's assembly, the same matrix
    numpy_acc = _linalg.GramAccumulator(precision).update(X)
    packed = numpy_acc.triangle()
    np.testing.assert_allclose(acc.triangle().numpy(), packed, rtol=0,
                               atol=1e-12 * np.abs(packed).max())
    for rule in ({}, {"rank": m // 4}, {"tol": 0.05}):
        fac, expected = acc.factorize(**rule), numpy_acc.factorize(**rule)
        k = fac.trusted_rank if not rule else (rule.get("rank") or expected.rank_for_tol(0.05))
        np.testing.assert_array_equal(fac.perm[:k], expected.perm[:k])
        np.testing.assert_allclose(fac.errors[: k + 1], expected.errors[: k + 1], rtol=1e-9,
                                   atol=1e-7)  # a Gram's errors near 0: its rounding


def test_numpy_and_gpu_products_fill_both_triangles():
    X = data(30, 100)
    _, _, symmetric = _gram._whole_product(X, None)
    assert symmetric
    assert _gram._product_step(np.ones((3, 100))) is None
    torch.set_num_threads(2)
    assert _gram._product_step(torch.ones(3, 100)) == _blocking.product_step(100)
    assert _gram._product_step(torch.ones(3, 100, device="meta")) is None
    torch.set_num_threads(1)
    assert _gram._product_step(torch.ones(3, 100)) == _gram._NUMPY_BLAS
    assert _gram._product_step(torch.ones(3, 100, device="meta")) is None


@pytest.mark.parametrize("m", [40, 256, 300, 600])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_on_one_thread_multiplies_through_numpys_blas_into_the_same_panels(m, dtype):
    """On one torch thread the panels' rows are NumPy's products (``?gemm`` left of each
    square, ``?syrk`` on it, both triangles), written into the torch buffer: the statistic
    stays torch's, its Gram and factorization those of NumPy's accumulator."""
    torch.set_num_threads(1)
    X = data(90, m)
    block = torch.as_tensor(X, dtype=dtype)
    view = block.numpy()
    buffer, parts, symmetric = _gram._whole_product(block, None)
    assert symmetric and isinstance(buffer, torch.Tensor) and buffer.dtype == dtype
    for (start, stop), part in zip(_gram._panel_bounds(m), parts, strict=True):
        assert part.data_ptr() >= buffer.data_ptr()  # views into the buffer
        expected = view[:, start:stop].T @ view[:, :stop]
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        np.testing.assert_allclose(part.numpy(), expected, rtol=0,
                                   atol=tol * np.abs(expected).max())
        square = part[:, start:].numpy()
        np.testing.assert_array_equal(square, square.T)
    precision = "native" if dtype == torch.float32 else "float64"
    acc = _linalg.GramAccumulator(precision)
    for rows in np.array_split(np.arange(90), 3):
        acc.update(block[rows])
    assert acc._symmetric and all(isinstance(p, torch.Tensor) for p in acc._panels)
    numpy_acc = _linalg.GramAccumulator(precision).update(X.astype(view.dtype))
    np.testing.assert_allclose(acc.gram.numpy(), numpy_acc.gram, rtol=0,
                               atol=(1e-5 if dtype == torch.float32 else 1e-12)
                               * np.abs(numpy_acc.gram).max())
    fac, expected = acc.factorize(), numpy_acc.factorize()
    k = min(fac.trusted_rank, 20)
    np.testing.assert_array_equal(fac.perm[:k], expected.perm[:k])


@pytest.mark.parametrize("kind", ["numpy", "torch"])
@pytest.mark.parametrize("m", [1, 70, 256, 300, 600])
@pytest.mark.parametrize("threads", [1, 2])
def test_the_host_gram_is_the_gram_as_a_new_numpy_array(kind, m, threads):
    """``host_gram`` is ``gram`` bit for bit, a new float64 NumPy array (one panel or several;
    squares with both triangles, or, torch on two threads, with only G's), and the statistic
    goes on accumulating after it."""
    torch.set_num_threads(threads)  # the autouse fixture restores
    X = data(120, m)
    convert = torch.as_tensor if kind == "torch" else np.asarray
    acc = _linalg.GramAccumulator("native")
    for part in np.array_split(X, 3):
        acc.update(convert(part.astype(np.float32)))
    host = acc.host_gram()
    assert type(host) is np.ndarray and host.dtype == np.float64 and host.flags.c_contiguous
    np.testing.assert_array_equal(host, _array.to_numpy(acc.gram))
    assert not any(np.shares_memory(host, _array.to_numpy(p)) for p in acc._panels)
    host[:] = np.nan  # the caller's to overwrite
    acc.update(convert(X[:5].astype(np.float32)))
    np.testing.assert_array_equal(acc.host_gram(), _array.to_numpy(acc.gram))
    assert _linalg.GramAccumulator().host_gram() is None
