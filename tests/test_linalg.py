"""The statistics core: pivoted Cholesky of the Gram and pivoted QR of a streamed R factor."""

import threading

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


# ------------------------------------------------------------------------- block pivoting


def _head_blocks(n_heads, head_dim):
    return [np.arange(h * head_dim, (h + 1) * head_dim) for h in range(n_heads)]


def _block_error(X, columns, T):
    return np.linalg.norm(X - X[:, columns] @ T) / np.linalg.norm(X)


def test_block_pivoting_errors_are_exact_for_every_number_of_blocks():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((200, 24)) @ rng.standard_normal((24, 24))
    fac = _linalg.BlockPivotedFactorization(X.T @ X, _head_blocks(6, 4))
    assert sorted(fac.order) == list(range(6))
    assert np.all(np.diff(fac.errors) <= 1e-12) and fac.errors[0] == 1 and fac.errors[-1] == 0
    for k in range(1, 7):
        blocks, columns, T = fac.select(k)
        assert list(blocks) == list(fac.order[:k]) and T.shape == (4 * k, 24)
        assert _block_error(X, columns, T) == pytest.approx(fac.errors[k], abs=1e-9)


def test_block_pivoting_takes_the_best_block_first_and_finds_exact_spans():
    rng = np.random.default_rng(1)
    basis = rng.standard_normal((300, 8))  # heads 1 and 4 span everything
    X = np.empty((300, 24))
    X[:, 4:8], X[:, 16:20] = basis[:, :4], basis[:, 4:]
    for h in (0, 2, 3, 5):
        X[:, 4 * h : 4 * h + 4] = basis @ rng.standard_normal((8, 4))
    blocks = _head_blocks(6, 4)
    fac = _linalg.BlockPivotedFactorization(X.T @ X, blocks)
    singles = [
        _block_error(X, b, np.linalg.lstsq(X[:, b], X, rcond=None)[0]) for b in blocks
    ]
    assert fac.order[0] == int(np.argmin(singles))
    assert fac.errors[2] < 1e-7  # two heads reconstruct all of them
    _, columns, T = fac.select(2)
    assert _block_error(X, columns, T) < 1e-7


def test_block_pivoting_keeping_every_block_is_the_identity_fit():
    # nothing to solve: the exact fit, also where the blocks are linearly dependent (the
    # least-squares minimum-norm T would be a projector there, which changes the consumer's
    # weights off the calibration data's span)
    rng = np.random.default_rng(3)
    X = rng.standard_normal((100, 8)) @ rng.standard_normal((8, 24))  # rank 8 of 24
    fac = _linalg.BlockPivotedFactorization(X.T @ X, _head_blocks(6, 4))
    blocks, columns, T = fac.select(6)
    assert sorted(columns) == list(range(24))
    np.testing.assert_array_equal(T, np.eye(24)[columns])
    np.testing.assert_array_equal(X[:, columns] @ T, X)


def test_block_pivoting_in_rounds_keeps_equal_counts_per_group():
    rng = np.random.default_rng(2)
    X = rng.standard_normal((100, 8)) @ rng.standard_normal((8, 32))  # rank 8: one group wins
    groups = [0, 0, 0, 0, 1, 1, 1, 1]  # 8 query heads in 2 key/value groups
    fac = _linalg.BlockPivotedFactorization(X.T @ X, _head_blocks(8, 4), partition=groups)
    for rounds in range(1, 5):
        kept = fac.order[: 2 * rounds]
        assert np.bincount(np.asarray(groups)[kept], minlength=2).tolist() == [rounds] * 2


def _greedy_by_trace(G, blocks, partition=None):
    """The block greedy as first written: each gain the trace of an m × m product ``hᵀh``."""
    from skid._linalg._psd import inverse_root_product

    S, m = G.copy(), G.shape[0]
    cutoff = np.finfo(float).eps * m * max(float(np.trace(S)), np.finfo(float).tiny)
    labels = np.zeros(len(blocks), int) if partition is None else np.asarray(partition)
    remaining, order, served, gains_of_steps = list(range(len(blocks))), [], set(), []
    while remaining:
        if partition is not None and served >= {labels[b] for b in remaining}:
            served = set()
        eligible = [b for b in remaining if partition is None or labels[b] not in served]
        halves = []
        for b in eligible:  # the same halves as the factorization's
            halves.append(inverse_root_product(S[np.ix_(blocks[b], blocks[b])], S[blocks[b]],
                                               cutoff))
        gains = [float(np.trace(h.T @ h)) for h in halves]
        gains_of_steps.append((halves, gains))
        best = eligible[int(np.argmax(gains))]
        S -= halves[int(np.argmax(gains))].T @ halves[int(np.argmax(gains))]
        order.append(best)
        remaining.remove(best)
        served.add(labels[best])
    return order, gains_of_steps


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("rounds", [False, True])
def test_block_pivoting_gains_as_norms_keep_the_trace_greedy(seed, rounds):
    # ‖h‖_F² instead of tr(hᵀh): the same gains, and the same order, ties included (an exact
    # copy of a head, a head of zeros, two equal heads left once a copy of them is kept)
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((120, 8)) @ rng.standard_normal((8, 32))
    X[:, 8:12] = X[:, 0:4]  # head 2 = head 0
    X[:, 20:24] = 0.0  # head 5: nothing
    X[:, 24:28] = X[:, 28:32] = rng.standard_normal((120, 4))  # heads 6 and 7: equal
    blocks, partition = _head_blocks(8, 4), ([0, 1] * 4 if rounds else None)
    fac = _linalg.BlockPivotedFactorization(X.T @ X, blocks, partition=partition)
    order, steps = _greedy_by_trace(X.T @ X, blocks, partition)
    assert list(fac.order) == order
    for halves, gains in steps:
        np.testing.assert_allclose([fac._gain(h) for h in halves], gains, rtol=1e-12,
                                   atol=1e-12 * max(gains))
    assert fac.order.tolist().index(0) < fac.order.tolist().index(2)  # the first of a tie
    if not rounds:
        assert fac.order.tolist().index(6) < fac.order.tolist().index(7)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("rounds", [False, True])
def test_block_pivoting_on_the_columns_left_is_the_full_complements_greedy(rounds, weighted):
    # the greedy downdates and searches only the columns not kept yet (the kept ones' rows of
    # the complement are zero but for rounding): the order, and the errors of the m × m
    # complement's greedy (each step's trace, weighted: tr(W S))
    from skid._linalg._psd import inverse_root_product

    rng = np.random.default_rng(5)
    X = rng.standard_normal((400, 96)) * np.arange(1, 97) ** -0.7 @ rng.standard_normal((96, 96))
    G, blocks = X.T @ X, _head_blocks(12, 8)
    partition = [0, 1, 2] * 4 if rounds else None
    A = rng.standard_normal((30, 96))
    weights = A.T @ A if weighted else None
    fac = _linalg.BlockPivotedFactorization(G, blocks, partition=partition,
                                            weight_gram=weights)
    energy = (np.trace if weights is None
              else lambda S: float(np.einsum("ij,ji->", weights, S)))
    S = G.copy()
    cutoff = np.finfo(float).eps * 96 * float(np.trace(S))
    tail = [energy(S)]
    for b in fac.order:  # the full complement along the factorization's order
        h = inverse_root_product(S[np.ix_(blocks[b], blocks[b])], S[blocks[b]], cutoff)
        S -= h.T @ h
        tail.append(energy(S))
    np.testing.assert_allclose(fac.errors[:-1], np.sqrt(np.maximum(tail[:-1], 0) / tail[0]),
                               rtol=1e-9, atol=1e-12)
    if not weighted:
        order, _ = _greedy_by_trace(G, blocks, partition)
        assert list(fac.order) == order


@pytest.mark.parametrize("rank", [24, 10, 0])
def test_block_pivoting_t_solve_is_scipys_pinvh(rank):
    # T from syevd, as scipy.linalg.pinvh (syev) gives it: full rank, dependent columns, zeros
    from skid._linalg._psd import pinvh_solve

    rng = np.random.default_rng(rank)
    X = rng.standard_normal((80, rank)) @ rng.standard_normal((rank, 24)) * 1e3
    G = X.T @ X
    expected = scipy.linalg.pinvh(G[:16, :16]) @ G[:16]
    np.testing.assert_allclose(pinvh_solve(G[:16, :16], G[:16]), expected,
                               atol=1e-9 * max(1.0, np.abs(expected).max()))


def test_block_pivoting_rejects_bad_input():
    G = np.eye(8)
    with pytest.raises(ValueError, match="partition the Gram's columns"):
        _linalg.BlockPivotedFactorization(G, [np.arange(4), np.arange(3, 8)])
    with pytest.raises(ValueError, match="one label per block"):
        _linalg.BlockPivotedFactorization(G, _head_blocks(2, 4), partition=[0])
    with pytest.raises(ValueError, match="NaN or infinite"):
        _linalg.BlockPivotedFactorization(np.full((8, 8), np.nan), _head_blocks(2, 4))
    with pytest.raises(ValueError, match="k must be in"):
        _linalg.BlockPivotedFactorization(G, _head_blocks(2, 4)).select(3)


# ---------------------------------------------------------------- output-aware selection


def _output_error(X, W, selected, T):
    return np.linalg.norm((X - X[:, selected] @ T) @ W.T) / np.linalg.norm(X @ W.T)


@pytest.mark.parametrize("how", ["scaled", "greedy"])
def test_output_aware_errors_are_exact_output_errors(how):
    X = low_rank(400, 30, 30, seed=3)
    W = np.random.default_rng(4).standard_normal((7, 30)) * np.linspace(0.01, 3, 30)
    fac = _linalg.factorize_gram(X.T @ X)
    out = _linalg.factorize_for_outputs(fac, W.T @ W, how=how)
    assert sorted(out.perm) == list(range(30)) and out.errors[0] == 1 and out.errors[-1] == 0
    for k in (1, 4, 11, 29):
        selected, T = out.select(k)
        np.testing.assert_allclose(T[:, selected], np.eye(k), atol=1e-10)
        # T is still the least-squares fit on X: the activation error of the same columns.
        lsq = np.linalg.lstsq(X[:, selected], X, rcond=None)[0]
        np.testing.assert_allclose(T, lsq, atol=1e-7)
        assert _output_error(X, W, selected, T) == pytest.approx(out.errors[k], abs=1e-8)


def test_output_aware_selection_ignores_columns_the_consumer_ignores():
    X = low_rank(300, 12, 12, seed=5)
    X[:, 0] *= 100  # the largest column, but the consumer never reads it
    W = np.random.default_rng(9).standard_normal((20, 12))  # full column rank
    W[:, 0] = 0
    fac = _linalg.factorize_gram(X.T @ X)
    assert fac.perm[0] == 0
    for how in ("scaled", "greedy"):
        out = _linalg.factorize_for_outputs(fac, W.T @ W, how=how)
        assert 0 not in out.perm[:11]


def test_output_greedy_never_worse_than_activation_pivots_on_outputs():
    X = low_rank(300, 20, 20, seed=6, noise=0.1)
    W = np.random.default_rng(7).standard_normal((5, 20)) ** 3
    fac = _linalg.factorize_gram(X.T @ X)
    greedy = _linalg.factorize_for_outputs(fac, W.T @ W, how="greedy")
    first = greedy.select(1)
    plain = fac.select(1)
    assert _output_error(X, W, *first) <= _output_error(X, W, *plain) + 1e-12


def test_block_pivoting_with_consumer_weights_reports_output_errors():
    rng = np.random.default_rng(8)
    X = rng.standard_normal((200, 16))
    W = rng.standard_normal((5, 16))
    W[:, :4] = 0  # head 0 is never read
    fac = _linalg.BlockPivotedFactorization(X.T @ X, _head_blocks(4, 4), weight_gram=W.T @ W)
    assert fac.order[-1] == 0
    for k in range(1, 5):
        _, columns, T = fac.select(k)
        assert _output_error(X, W, columns, T) == pytest.approx(fac.errors[k], abs=1e-9)


# ----------------------------------------------------------- rows, rounding and magnitudes


@pytest.mark.parametrize("precision", ["native", "float64"])
def test_float32_gram_trusts_no_rounding_pivot(precision):
    # rank-100 float32 data: float32 products once trusted 109 pivots, with max |T| near 7
    X = low_rank(2000, 300, 100, seed=12).astype(np.float32)
    fac = _linalg.GramAccumulator(precision).update(X).factorize()
    assert fac.trusted_rank == 100
    reference = _linalg.QRAccumulator().update(X).factorize()
    assert reference.trusted_rank == 100
    _, T = fac.select(150)
    _, T_qr = reference.select(150)
    assert np.abs(T).max() <= 2 * np.abs(T_qr).max()


@pytest.mark.parametrize("Acc", ACCUMULATORS)
def test_trusted_rank_never_exceeds_the_rows_seen(Acc):
    X = np.random.default_rng(13).standard_normal((100, 512))
    acc = Acc().update(X)
    fac = acc.factorize()
    assert fac.n_samples == 100 and fac.trusted_rank <= 100
    selected, T = fac.select(256)
    assert np.abs(T).max() < 1e3  # the noise pivots of the Gram gave entries near 1e8
    assert measured_error(X, selected, T) < 1e-6


@pytest.mark.parametrize("Acc", ACCUMULATORS)
@pytest.mark.parametrize("scale", [1e160, 1e-170, 1e-300])
def test_extreme_magnitudes_give_the_unscaled_result(Acc, scale):
    X = low_rank(200, 30, 30, seed=14)
    reference = Acc().update(X).factorize()
    fac = Acc().update(X * scale).factorize()
    assert np.array_equal(fac.perm, reference.perm)
    np.testing.assert_allclose(fac.errors, reference.errors, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(fac.select(10)[1], reference.select(10)[1], rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("scale", [1e20, 1e-30])
def test_extreme_float32_magnitudes_with_float32_products(scale):
    X = low_rank(500, 20, 20, seed=15)
    reference = _linalg.GramAccumulator().update(X).factorize()
    fac = _linalg.GramAccumulator("native").update((X * scale).astype(np.float32)).factorize()
    assert np.isfinite(fac.errors).all()
    np.testing.assert_allclose(fac.errors[1:-1], reference.errors[1:-1], rtol=1e-3)


@pytest.mark.parametrize("Acc", ACCUMULATORS)
def test_a_bad_block_leaves_the_statistic_unchanged(Acc):
    X = low_rank(60, 6, 6, seed=16)
    acc = Acc().update(X[:30])
    before = acc.factorize()
    bad = X[30:].copy()
    bad[3, 2] = np.inf
    with pytest.raises(ValueError, match="contain NaN or infinite"):
        acc.update(bad)
    assert acc.n_samples == 30
    np.testing.assert_array_equal(acc.factorize().errors, before.errors)
    acc.update(X[30:] * 1e160)  # huge but finite: scaled, not an error
    acc.update(X[30:])
    whole = Acc().update(np.vstack([X[:30], X[30:] * 1e160, X[30:]])).factorize()
    np.testing.assert_allclose(acc.factorize().errors, whole.errors, rtol=1e-9, atol=1e-12)


def test_randomized_route_scales_extreme_data():
    X = low_rank(300, 40, 40, seed=17)
    selected, T, error = _linalg.randomized_factorization(X, 8, np.random.default_rng(0))
    for scale in (1e160, 1e-170):
        s, t, e = _linalg.randomized_factorization(X * scale, 8, np.random.default_rng(0))
        assert np.array_equal(s, selected)
        np.testing.assert_allclose(t, T, rtol=1e-8, atol=1e-10)
        assert e == pytest.approx(error, rel=1e-9)
    bad = X.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="contain NaN or infinite"):
        _linalg.randomized_factorization(bad, 8, np.random.default_rng(0))


def test_select_writes_T_in_the_original_column_order():
    """Kept columns get identity columns of T, and T reconstructs X to the reported error."""
    m, k = 512, 256
    X = np.random.default_rng(3).standard_normal((700, m))
    fac = _linalg.GramAccumulator().update(X).factorize()
    keep, T = fac.select(k)
    np.testing.assert_array_equal(T[:, keep], np.eye(k))
    residual = np.linalg.norm(X - X[:, keep] @ T) / np.linalg.norm(X)
    assert residual == pytest.approx(fac.errors[k], rel=1e-6)


def _psd_with_spectrum(eigenvalues, seed=0):
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((len(eigenvalues),) * 2))
    A = (Q * np.asarray(eigenvalues, dtype=float)) @ Q.T
    return (A + A.T) / 2


@pytest.mark.parametrize("n", [1, 4, 16, 64])
def test_a_definite_factor_only_where_no_eigenvalue_is_at_or_below_the_cutoff(n):
    """The Cholesky path is taken only where the pseudo-inverse would drop nothing: never with
    the smallest eigenvalue at or below the cutoff (or near it), always well above it."""
    from skid._linalg._psd import definite_factor

    cutoff = 1e-6
    for f in [0.0, 0.5, 1.0 - 1e-9, 1.0]:  # at or below the cutoff: never Cholesky
        A = _psd_with_spectrum(np.r_[np.linspace(1.0, 2.0, n - 1), f * cutoff], seed=n)
        assert definite_factor(A, cutoff) is None, f
    rng = np.random.default_rng(n)
    for trial in range(50):  # around the cutoff: a factor only where the smallest is above
        smallest = cutoff * 10.0 ** rng.uniform(-3, 3)
        A = _psd_with_spectrum(np.r_[10.0 ** rng.uniform(-6, 1, n - 1), smallest], trial)
        if definite_factor(A, cutoff) is not None:
            assert np.linalg.eigvalsh(A).min() > cutoff
    A = _psd_with_spectrum(np.r_[np.linspace(1.0, 2.0, n - 1), 1e3 * cutoff], seed=n)
    L = definite_factor(A, cutoff)
    assert L is not None
    np.testing.assert_allclose(L @ L.T, A, atol=1e-13)
    assert np.array_equal(L, np.tril(L))
    assert definite_factor(np.zeros((n, n)), 0.0) is None
    assert definite_factor(-np.eye(n), 0.0) is None  # not positive semi-definite


@pytest.mark.parametrize("rank", [16, 9, 0])
def test_inverse_root_products_match_the_eigendecompositions(monkeypatch, rank):
    """``HᵀH = Bᵀ A⁺ B`` either way: Cholesky where A is safely definite, the eigenpairs
    above the cutoff otherwise (then exactly the old computation)."""
    from skid._linalg import _psd

    rng = np.random.default_rng(rank)
    X = rng.standard_normal((60, rank)) @ rng.standard_normal((rank, 40))
    G = X.T @ X
    cutoff = np.finfo(float).eps * 40 * max(np.trace(G), np.finfo(float).tiny)
    A, B = G[:16, :16], G[:16]
    w, V = np.linalg.eigh(A)
    keep = w > cutoff
    by_eigh = (V[:, keep] / np.sqrt(w[keep])).T @ B
    H = _psd.inverse_root_product(A, B, cutoff)
    scale = max(1.0, np.abs(by_eigh.T @ by_eigh).max())
    np.testing.assert_allclose(H.T @ H, by_eigh.T @ by_eigh, atol=1e-9 * scale)
    assert (_psd.definite_factor(A, cutoff) is not None) == (rank >= 16)
    if rank < 16:  # singular: the eigendecomposition's own result, bit for bit
        np.testing.assert_array_equal(H, by_eigh)


def test_pinvh_solve_takes_cholesky_only_for_a_safely_definite_matrix(monkeypatch):
    """A well-conditioned Gram block is solved from its Cholesky factor (no eigenvalues
    computed); one with an eigenvalue near the pseudo-inverse's cutoff goes through them."""
    from skid._linalg import _psd

    calls = []
    eigh = np.linalg.eigh
    monkeypatch.setattr(np.linalg, "eigh", lambda a: calls.append(a.shape) or eigh(a))
    B = np.random.default_rng(0).standard_normal((16, 5))
    good = _psd_with_spectrum(np.linspace(1.0, 10.0, 16))
    np.testing.assert_allclose(_psd.pinvh_solve(good, B), scipy.linalg.pinvh(good) @ B,
                               rtol=1e-10)
    assert calls == []
    near = _psd_with_spectrum(np.r_[np.linspace(1.0, 10.0, 15), 1e-14])
    np.testing.assert_allclose(_psd.pinvh_solve(near, B), scipy.linalg.pinvh(near) @ B,
                               atol=1e-6 * np.abs(scipy.linalg.pinvh(near) @ B).max())
    assert calls == [(16, 16)]


@pytest.mark.parametrize("n, rank", [(0, 0), (1, 1), (7, 7), (300, 300), (300, 120)])
@pytest.mark.parametrize("lower", [True, False])
@pytest.mark.parametrize("tol", [-1.0, 1e-6])
def test_gil_free_dpstrf_is_scipys_bit_for_bit(n, rank, lower, tol):
    from scipy.linalg import lapack

    from skid._linalg._nogil import dpstrf

    rng = np.random.default_rng(n + rank)
    X = rng.standard_normal((n, rank))
    G = X @ X.T
    tol = tol * np.trace(G) if tol > 0 else tol
    theirs = lapack.dpstrf(np.asfortranarray(G), lower=int(lower), tol=tol)
    a = np.asfortranarray(G)
    ours = dpstrf(a, lower, tol)
    assert ours[0] is a  # in place
    triangle = np.tril if lower else np.triu
    np.testing.assert_array_equal(triangle(ours[0]), triangle(theirs[0]))
    np.testing.assert_array_equal(ours[1], theirs[1])
    assert ours[2:] == tuple(theirs[2:])


def test_gil_free_dpstrf_checks_scipys_signature_and_falls_back_to_its_wrapper(monkeypatch):
    """This SciPy exports dpstrf with LAPACK's 32-bit integers (the GIL-free path is taken);
    one exporting it otherwise gets SciPy's own wrapper, with the same result."""
    from scipy.linalg import lapack

    from skid._linalg import _nogil

    X = np.random.default_rng(1).standard_normal((40, 30))
    G = X @ X.T
    ours = _nogil.dpstrf(np.asfortranarray(G), True, -1.0)
    assert _nogil._routines["dpstrf"] is not None
    monkeypatch.setattr(_nogil, "_routines", {})
    monkeypatch.setattr(_nogil, "_DPSTRF_ARGS", ("char *", "long *"))  # not this SciPy's
    fallback = _nogil.dpstrf(np.asfortranarray(G), True, -1.0)
    assert _nogil._routines["dpstrf"] is None
    theirs = lapack.dpstrf(np.asfortranarray(G), lower=1)
    for result in (ours, fallback):
        np.testing.assert_array_equal(np.tril(result[0]), np.tril(theirs[0]))
        np.testing.assert_array_equal(result[1], theirs[1])
        assert result[2:] == tuple(theirs[2:])


def test_gil_free_dpstrf_refuses_what_it_cannot_write_in_place():
    from skid._linalg._nogil import dpstrf

    for bad in (np.eye(3), np.eye(3, dtype=np.float32).T, np.ones((3, 2), order="F")):
        with pytest.raises(ValueError, match="Fortran-ordered float64"):
            dpstrf(bad, True, -1.0)
    frozen = np.asfortranarray(np.eye(3))
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        dpstrf(frozen, True, -1.0)


@pytest.mark.parametrize("routine", ["dpstrf", "dtrsm"])
def test_gil_free_lapack_lets_other_threads_run(routine):
    """While one worker factorizes (or solves), another goes on running Python through the
    middle half of the call (SciPy's wrappers hold the GIL: the other could only run before
    and after)."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    from skid._linalg._nogil import dpstrf, dtrsm

    X = np.random.default_rng(0).standard_normal((2000, 2100))
    a = np.asfortranarray(X @ X.T)
    b = np.asfortranarray(X[:, :1500])
    run = {"dpstrf": lambda: dpstrf(a, True, -1.0),
           "dtrsm": lambda: dtrsm(a, b, right=False, lower=True)}[routine]
    stamps, call = [], {}
    counting, finished = threading.Event(), threading.Event()

    def count():
        while not finished.is_set():
            stamps.append(time.perf_counter())
            counting.set()

    def factorize():
        counting.wait()
        call["start"] = time.perf_counter()
        run()
        call["stop"] = time.perf_counter()
        finished.set()

    with ThreadPoolExecutor(2) as pool:
        for future in [pool.submit(count), pool.submit(factorize)]:
            future.result()
    quarter = (call["stop"] - call["start"]) / 4
    middle = [t for t in stamps if call["start"] + quarter < t < call["stop"] - quarter]
    assert len(middle) > 10


def _triangular_case(n, rows, seed):
    """A column-major upper triangle (QR's R) of a random n-column matrix, in both layouts."""
    R = np.linalg.qr(np.random.default_rng(seed).standard_normal((2 * n + 1, n)), mode="r")
    return np.ascontiguousarray(R), np.asfortranarray(R)


@pytest.mark.parametrize("n, rows, k", [(1, 1, 0), (9, 9, 9), (40, 25, 25), (40, 10, 25),
                                        (300, 200, 200), (300, 300, 150)])
def test_interpolation_solves_read_the_triangle_in_place_with_scipys_result(n, rows, k):
    """``U[:rows, :rows]⁻¹ U[:rows, k:]`` of a row-major factor (solved from the right on
    ``Uᵀ``) and of a column-major one (from the left, as SciPy does): SciPy's result, to
    rounding, and bit for bit where the solve is SciPy's own."""
    from skid._linalg._factorization import _interpolation

    for U in _triangular_case(n, rows, n + rows + k):
        theirs = scipy.linalg.solve_triangular(U[:rows, :rows], U[:rows, k:])
        ours = _interpolation(U, rows, k)
        assert ours.shape == theirs.shape == (rows, n - k)
        if U.flags.f_contiguous and U.ndim == 2 and n > 1:
            np.testing.assert_array_equal(ours, theirs)
        scale = max(np.abs(theirs).max(initial=0.0), 1.0)
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-12 * scale)


def test_interpolation_solve_of_a_singular_triangle_raises_as_scipy_does():
    from skid._linalg._factorization import _interpolation

    U = np.triu(np.random.default_rng(3).standard_normal((6, 6)))
    U[2, 2] = 0.0
    with pytest.raises(np.linalg.LinAlgError):
        _interpolation(U, 4, 4)


@pytest.mark.parametrize("right", [True, False])
@pytest.mark.parametrize("lower", [True, False])
def test_gil_free_dtrsm_solves_views_in_place(right, lower):
    """``b a⁻¹`` or ``a⁻¹ b`` with ``a`` a corner of a larger column-major array (its
    leading dimension past its rows) and ``b`` a column-major view; ``b`` is overwritten."""
    from skid._linalg._nogil import dtrsm

    rng = np.random.default_rng(int(right) * 2 + int(lower))
    big = np.asfortranarray(rng.standard_normal((50, 50)) + 50 * np.eye(50))
    a = big[:30, :30]
    tri = np.tril(a) if lower else np.triu(a)
    b = np.asfortranarray(rng.standard_normal((20, 30) if right else (30, 20)))
    expected = b @ np.linalg.inv(tri) if right else np.linalg.solve(tri, b)
    out = dtrsm(a, b, right=right, lower=lower)
    assert out is b
    np.testing.assert_allclose(b, expected, rtol=1e-10, atol=1e-12)
    assert np.array_equal(big[:30, :30], a)  # the triangle is only read


def test_gil_free_dtrsm_falls_back_to_scipys_wrapper_and_refuses_other_layouts(monkeypatch):
    from skid._linalg import _nogil

    rng = np.random.default_rng(5)
    a = np.asfortranarray(np.triu(rng.standard_normal((8, 8))) + 8 * np.eye(8))
    b = np.asfortranarray(rng.standard_normal((8, 3)))
    ours = _nogil.dtrsm(a, b.copy(order="F"), right=False, lower=False)
    assert _nogil._routines["dtrsm"] is not None
    monkeypatch.setattr(_nogil, "_routines", {})
    monkeypatch.setattr(_nogil, "_DTRSM_ARGS", ("char *",))  # not this SciPy's signature
    fallback = _nogil.dtrsm(a, b.copy(order="F"), right=False, lower=False)
    assert _nogil._routines["dtrsm"] is None
    np.testing.assert_array_equal(fallback, scipy.linalg.solve_triangular(a, b))
    np.testing.assert_allclose(ours, fallback, rtol=1e-13)
    for bad_a, bad_b in [(np.ascontiguousarray(a), b), (a, np.ascontiguousarray(b)),
                         (a.astype(np.float32), b), (a[:, :7], b)]:
        with pytest.raises(ValueError, match="column-major float64"):
            _nogil.dtrsm(bad_a, bad_b, right=False, lower=False)
    frozen = b.copy(order="F")
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        _nogil.dtrsm(a, frozen, right=False, lower=False)


def test_leading_dimension_is_blas_column_major_reading_in_place():
    """One rule for what BLAS reads without a copy (the Gram's blocks, dtrsm's operands)."""
    from skid._linalg._blocking import leading_dimension

    F = np.asfortranarray(np.ones((6, 4)))
    C = np.ones((6, 4))
    assert leading_dimension(F) == 6 and leading_dimension(F[:3, 1:]) == 6  # a corner
    assert leading_dimension(C) is None and leading_dimension(C.T) == 4
    assert leading_dimension(C[1:4].T) == 4  # row slices of a C-ordered array
    assert leading_dimension(F[::2]) is None and leading_dimension(C[:, ::2].T) is None
    # an axis of length one has no stride BLAS follows: a C-ordered column (strides (8, 8)) is
    # column-major with the rows as leading dimension, a row cut from C-ordered rows too
    assert leading_dimension(np.ones((6, 1))) == 6 and leading_dimension(np.ones((6, 1)).T) == 1
    assert leading_dimension(C[2:3]) == 1 and leading_dimension(C[:, 1:2]) is None
    assert leading_dimension(np.broadcast_to(np.ones((6, 1)), (6, 3))) is None
    assert leading_dimension(np.broadcast_to(np.ones((1, 1)), (6, 1))) is None


@pytest.mark.parametrize("right", [False, True])
def test_gil_free_dtrsm_solves_a_single_right_hand_side_in_any_contiguous_order(right):
    # one kept column's T, or one right-hand side: NumPy calls a C-ordered column (and a row
    # cut from C-ordered rows) contiguous in both orders, and BLAS reads it in place
    from skid._linalg import _nogil

    rng = np.random.default_rng(3)
    a = np.asfortranarray(np.triu(rng.standard_normal((4, 4))) + 4 * np.eye(4))
    # a row of C-ordered rows, strides (32, 8); a C-ordered column, strides (8, 8)
    b = rng.standard_normal((3, 4))[1:2] if right else rng.standard_normal((4, 1))
    expected = (scipy.linalg.solve_triangular(a, b.T, trans=1, lower=False).T if right
                else scipy.linalg.solve_triangular(a, b, lower=False))
    got = _nogil.dtrsm(a, b, right=right, lower=False)
    assert got is b  # solved in place, not refused
    np.testing.assert_allclose(got, expected, rtol=1e-12)
