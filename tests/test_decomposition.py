"""InterpolativeDecomposition and interp_decomp: properties, streaming, dtypes, bad input."""

import numpy as np
import pytest
import scipy.linalg.interpolative as sli
from hypothesis import given, settings
from hypothesis import strategies as st

from skid import InterpolativeDecomposition, InvalidParameterError, interp_decomp


def low_rank(n, m, r, seed=0, noise=0.0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, r)) @ rng.standard_normal((r, m))
    return (X + noise * rng.standard_normal((n, m))).astype(dtype)


def measured_error(X, est):
    X = np.asarray(X, dtype=np.float64)
    T = np.asarray(est.interpolation_matrix_, dtype=np.float64)
    return np.linalg.norm(X - X[:, est.selected_features_] @ T) / np.linalg.norm(X)


matrices = st.tuples(st.integers(2, 60), st.integers(1, 15), st.integers(0, 10_000))


@settings(max_examples=30, deadline=None)
@given(shape=matrices, method=st.sampled_from(["gram", "qr"]), frac=st.floats(0.05, 0.95))
def test_interpolation_is_identity_on_selected_and_error_is_measured(shape, method, frac):
    n, m, seed = shape
    X = np.random.default_rng(seed).standard_normal((n, m))
    est = InterpolativeDecomposition(rank=frac, method=method).fit(X)
    T = est.interpolation_matrix_
    np.testing.assert_allclose(T[:, est.selected_features_], np.eye(est.rank_), atol=1e-12)
    assert est.error_ == pytest.approx(measured_error(X, est), rel=1e-5, abs=1e-7)


@settings(max_examples=20, deadline=None)
@given(r=st.integers(1, 8), seed=st.integers(0, 10_000))
def test_exact_low_rank_is_recovered_to_rounding(r, seed):
    X = low_rank(80, 20, r, seed=seed)
    est = InterpolativeDecomposition(rank=r).fit(X)
    assert est.rank_ == r
    assert measured_error(X, est) < 1e-10
    assert InterpolativeDecomposition().fit(X).rank_ == r


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    cuts=st.lists(st.integers(1, 119), min_size=0, max_size=6),
    method=st.sampled_from(["auto", "gram", "qr"]),
)
def test_partial_fit_over_random_blocks_equals_fit(seed, cuts, method):
    X = low_rank(120, 10, 10, seed=seed, noise=0.0)
    whole = InterpolativeDecomposition(rank=6, method=method).fit(X)
    streamed = InterpolativeDecomposition(rank=6, method=method)
    for block in np.split(X, sorted(set(cuts))):
        streamed.partial_fit(block)
    assert streamed.n_samples_seen_ == 120
    assert np.array_equal(whole.selected_features_, streamed.selected_features_)
    np.testing.assert_allclose(
        whole.interpolation_matrix_, streamed.interpolation_matrix_, atol=1e-8
    )


@settings(max_examples=25, deadline=None)
@given(shape=matrices, tol=st.floats(1e-3, 0.9))
def test_tol_gives_the_smallest_rank_meeting_it(shape, tol):
    n, m, seed = shape
    X = np.random.default_rng(seed).standard_normal((n, m))
    est = InterpolativeDecomposition(tol=tol).fit(X)
    assert measured_error(X, est) <= tol * (1 + 1e-9)
    if est.rank_ > 1:
        smaller = InterpolativeDecomposition(rank=est.rank_ - 1, method="qr").fit(X)
        assert smaller.error_ > tol


def test_same_random_state_same_result():
    X = low_rank(3000, 1024, 1024, seed=1)
    a = InterpolativeDecomposition(rank=64, random_state=3).fit(X)
    b = InterpolativeDecomposition(rank=64, random_state=3).fit(X)
    assert a.method_ == "randomized"
    assert np.array_equal(a.selected_features_, b.selected_features_)
    np.testing.assert_array_equal(a.interpolation_matrix_, b.interpolation_matrix_)


@pytest.mark.parametrize("method", ["gram", "qr", "randomized"])
def test_error_not_worse_than_scipy_deterministic_id(method):
    rng = np.random.default_rng(0)
    X = np.maximum(rng.standard_normal((2000, 32)) @ rng.standard_normal((32, 96)), 0)
    X += 0.01 * rng.standard_normal(X.shape)
    k = 24
    idx, proj = sli.interp_decomp(X.copy(order="F"), k, rand=False)
    P = np.hstack([np.eye(k), proj])[:, np.argsort(idx)]
    scipy_error = np.linalg.norm(X - X[:, idx[:k]] @ P) / np.linalg.norm(X)
    ours = InterpolativeDecomposition(rank=k, method=method, random_state=0).fit(X)
    slack = 1.15 if method == "randomized" else 1 + 1e-8
    assert ours.error_ <= scipy_error * slack


def test_auto_rule_table():
    X64 = low_rank(400, 40, 40, seed=0)
    X32 = X64.astype(np.float32)
    wide = low_rank(2000, 1024, 50, seed=0, noise=1e-2)
    cases = [
        (X64, dict(tol=1e-2), "gram"),
        (X64, dict(tol=1e-6), "qr"),
        (X64, dict(), "qr"),
        (X32, dict(), "gram"),
        (X64, dict(rank=10), "gram"),
        (wide, dict(rank=100), "randomized"),
        (wide, dict(rank=300), "gram"),
    ]
    for X, params, expected in cases:
        assert InterpolativeDecomposition(**params).fit(X).method_ == expected, params


def test_auto_escalates_to_qr_when_gram_cannot_resolve_the_error():
    X = low_rank(300, 30, 5, seed=2)
    est = InterpolativeDecomposition(rank=5).fit(X)
    assert est.method_ == "qr"
    assert measured_error(X, est) < 1e-12


def test_float32_stays_float32_and_is_accurate():
    X = low_rank(500, 30, 30, seed=3, dtype=np.float32)
    est = InterpolativeDecomposition(rank=10).fit(X)
    assert est.interpolation_matrix_.dtype == np.float32
    assert est.transform(X).dtype == np.float32
    assert est.inverse_transform(est.transform(X)).dtype == np.float32
    ref = InterpolativeDecomposition(rank=10).fit(X.astype(np.float64))
    assert np.array_equal(est.selected_features_, ref.selected_features_)
    assert est.error_ == pytest.approx(ref.error_, rel=1e-4)


def test_integer_and_float16_data_are_documented_upcasts():
    Xi = np.arange(60).reshape(12, 5) % 7
    est = InterpolativeDecomposition(rank=2).fit(Xi)
    assert est.interpolation_matrix_.dtype == np.float64
    est16 = InterpolativeDecomposition(rank=2).fit(Xi.astype(np.float16))
    assert est16.interpolation_matrix_.dtype == np.float64


def test_inputs_are_never_modified():
    X = low_rank(100, 10, 10, seed=4)
    X_copy = X.copy()
    est = InterpolativeDecomposition(rank=4).fit(X)
    est.partial_fit(X)
    Xk = est.transform(X)
    Xk_copy = Xk.copy()
    est.inverse_transform(Xk)
    est.score(X)
    np.testing.assert_array_equal(X, X_copy)
    np.testing.assert_array_equal(Xk, Xk_copy)


def test_transform_inverse_and_support_agree():
    X = low_rank(50, 8, 3, seed=5, noise=1e-3)
    est = InterpolativeDecomposition(rank=3).fit(X)
    np.testing.assert_array_equal(est.transform(X), X[:, est.get_support(indices=True)])
    assert est.get_support().sum() == 3
    assert np.array_equal(np.flatnonzero(est.get_support()), np.sort(est.selected_features_))
    assert list(est.get_feature_names_out()) == [f"x{i}" for i in est.selected_features_]
    expected_score = 1 - measured_error(X, est)
    assert est.score(X) == pytest.approx(expected_score, rel=1e-9)


def test_dataframe_names_and_set_output():
    pd = pytest.importorskip("pandas")
    X = low_rank(40, 5, 2, seed=6)
    df = pd.DataFrame(X, columns=list("abcde"))
    est = InterpolativeDecomposition(rank=2).set_output(transform="pandas").fit(df)
    out = est.transform(df)
    assert list(out.columns) == list(np.array(list("abcde"))[est.selected_features_])
    assert list(est.feature_names_in_) == list("abcde")


def test_refit_on_a_float_array_forgets_the_dataframe_names():
    pd = pytest.importorskip("pandas")
    X = low_rank(40, 5, 2, seed=6)
    est = InterpolativeDecomposition(rank=2).fit(pd.DataFrame(X, columns=list("abcde")))
    est.fit(X[:, :4].astype(np.float32))  # a float ndarray: the fast validation path
    assert not hasattr(est, "feature_names_in_") and est.n_features_in_ == 4
    with pytest.raises(ValueError, match="4 features"):
        est.transform(X)
    with pytest.raises(ValueError, match="2-?D"):
        InterpolativeDecomposition(rank=1).fit(X[0])


def test_torch_cpu_tensor_stays_a_tensor():
    torch = pytest.importorskip("torch")
    X = torch.as_tensor(low_rank(60, 9, 3, seed=7, dtype=np.float32))
    est = InterpolativeDecomposition(rank=3).fit(X)
    assert isinstance(est.interpolation_matrix_, torch.Tensor)
    assert est.interpolation_matrix_.dtype == torch.float32
    Xk = est.transform(X)
    assert isinstance(Xk, torch.Tensor) and Xk.shape == (60, 3)
    assert float(torch.linalg.norm(est.inverse_transform(Xk) - X) / torch.linalg.norm(X)) < 1e-4


def test_zero_matrix_keeps_one_column_with_zero_error():
    est = InterpolativeDecomposition().fit(np.zeros((6, 4)))
    assert est.rank_ == 1 and est.error_ == 0.0
    assert est.score(np.zeros((6, 4))) == 1.0


def test_fewer_samples_than_features():
    X = low_rank(5, 20, 5, seed=8)
    est = InterpolativeDecomposition().fit(X)
    assert est.rank_ == 5
    assert measured_error(X, est) < 1e-10


@pytest.mark.parametrize(
    "params, X, match",
    [
        (dict(rank=3, tol=0.1), np.ones((4, 4)), "not both"),
        (dict(rank=10), np.ones((4, 6)), r"rank=10 exceeds min\(n_samples, n_features\)"),
        (dict(rank=0), np.ones((4, 4)), "'rank' parameter"),
        (dict(rank=1.5), np.ones((4, 4)), "'rank' parameter"),
        (dict(tol=1.0), np.ones((4, 4)), "'tol' parameter"),
        (dict(method="svd"), np.ones((4, 4)), "'method' parameter must be one of"),
        (dict(), np.array([[1.0, np.nan], [2.0, 3.0]]), "NaN"),
        (dict(), np.array([[1.0, np.inf], [2.0, 3.0]]), "infinit"),
        (dict(rank=1, method="randomized"), np.array([[1.0, np.inf], [2.0, 3.0]]), "infinit"),
        (dict(), np.ones(5), "2D array"),
        (dict(), np.ones((0, 3)), "0 sample"),
        (dict(), np.ones((3, 2)) * 1j, "[Cc]omplex"),
    ],
)
def test_bad_input_raises_clearly(params, X, match):
    with pytest.raises((ValueError, TypeError), match=match):
        InterpolativeDecomposition(**params).fit(X)


def test_invalid_parameter_error_is_value_and_type_error():
    with pytest.raises(InvalidParameterError):
        InterpolativeDecomposition(rank="ten").fit(np.ones((3, 3)))
    assert issubclass(InvalidParameterError, ValueError)
    assert issubclass(InvalidParameterError, TypeError)


def test_partial_fit_with_changed_width_raises():
    est = InterpolativeDecomposition(rank=2).partial_fit(np.ones((5, 4)))
    with pytest.raises(ValueError, match="X has 3 features"):
        est.partial_fit(np.ones((5, 3)))


def test_a_bad_block_does_not_poison_partial_fit():
    X = low_rank(60, 6, 6, seed=11)
    est = InterpolativeDecomposition(rank=3).partial_fit(X[:30])
    bad = X[30:].copy()
    bad[4, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        est.partial_fit(bad)
    est.partial_fit(X[30:])
    whole = InterpolativeDecomposition(rank=3).fit(X)
    assert est.n_samples_seen_ == 60
    assert np.array_equal(est.selected_features_, whole.selected_features_)


def test_partial_fit_randomized_raises():
    with pytest.raises(ValueError, match="cannot stream"):
        InterpolativeDecomposition(rank=2, method="randomized").partial_fit(np.ones((5, 4)))


def test_inverse_transform_checks_width():
    est = InterpolativeDecomposition(rank=2).fit(low_rank(10, 5, 5))
    with pytest.raises(ValueError, match=r"shape \(n_samples, 2\)"):
        est.inverse_transform(np.ones((3, 5)))


def test_interp_decomp_function_matches_estimator():
    X = low_rank(70, 12, 12, seed=9)
    selected, T = interp_decomp(X, 5)
    est = InterpolativeDecomposition(rank=5).fit(X)
    assert np.array_equal(selected, est.selected_features_)
    np.testing.assert_allclose(T, est.interpolation_matrix_)


def test_cupy_backend_without_cupy_says_how_to_install():
    try:
        import cupy  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="skid\\[cupy\\]"):
            InterpolativeDecomposition(rank=1, backend="cupy").fit(np.ones((3, 3)))
    else:
        pytest.skip("CuPy is installed")


@pytest.mark.parametrize("noise, method", [(1e-2, "gram"), (1e-5, "gram"), (1e-5, "auto")])
def test_float32_rank_requests_are_accurate_at_any_error_level(noise, method):
    X = low_rank(4000, 40, 6, seed=10, noise=noise, dtype=np.float32)
    est = InterpolativeDecomposition(rank=6, method=method).fit(X)
    assert est.error_ == pytest.approx(measured_error(X, est), rel=1e-2)


@pytest.mark.parametrize("params", [dict(tol=0.1), dict()])
def test_randomized_needs_a_rank(params):
    with pytest.raises(ValueError, match="method='randomized' needs rank"):
        InterpolativeDecomposition(method="randomized", **params).fit(np.ones((20, 8)))


def test_partial_fit_after_a_randomized_fit_raises_instead_of_restarting():
    rng = np.random.default_rng(12)
    est = InterpolativeDecomposition(rank=5).fit(rng.standard_normal((10, 2048)))
    assert est.method_ == "randomized"
    with pytest.raises(ValueError, match="partial_fit cannot continue.*randomized"):
        est.partial_fit(rng.standard_normal((30, 2048)))
    assert est.n_samples_seen_ == 10


def test_partial_fit_after_fit_continues():
    X = low_rank(40, 12, 12, seed=13)
    est = InterpolativeDecomposition(rank=4).fit(X[:10]).partial_fit(X[10:])
    whole = InterpolativeDecomposition(rank=4).partial_fit(X)
    assert est.n_samples_seen_ == 40
    assert np.array_equal(est.selected_features_, whole.selected_features_)


def scale_free_error(X, est):
    X = np.asarray(X, dtype=np.float64)
    return measured_error(X / np.abs(X).max(), est)


@pytest.mark.parametrize(
    "scale, dtype, params",
    [
        (1e160, np.float64, dict(rank=10)),
        (1e20, np.float32, dict(rank=10)),
        (1e160, np.float64, dict(rank=10, method="qr")),
        (1e160, np.float64, dict(rank=10, method="randomized", random_state=0)),
        (1e-170, np.float64, dict(tol=0.3)),
        (1e-170, np.float64, dict(rank=10, method="qr")),
        (1e-300, np.float64, dict(rank=10, method="gram")),
        (1e-30, np.float32, dict(rank=10)),
    ],
)
def test_extreme_finite_magnitudes(scale, dtype, params):
    rng = np.random.default_rng(14)
    A = rng.standard_normal((200, 30)) @ np.diag(np.logspace(0, -2, 30))
    A = A @ rng.standard_normal((30, 30))
    reference = InterpolativeDecomposition(**params).fit(A.astype(dtype))
    est = InterpolativeDecomposition(**params).fit((A * scale).astype(dtype))
    assert est.rank_ == reference.rank_
    assert np.array_equal(est.selected_features_, reference.selected_features_)
    assert est.error_ == pytest.approx(reference.error_, rel=1e-4)
    assert est.error_ == pytest.approx(scale_free_error((A * scale).astype(dtype), est), rel=1e-3)


def test_one_huge_block_does_not_poison_partial_fit():
    X = low_rank(90, 8, 8, seed=15)
    blocks = [X[:30], X[30:60] * 1e160, X[60:]]
    est = InterpolativeDecomposition(rank=3)
    for block in blocks:
        est.partial_fit(block)
    whole = InterpolativeDecomposition(rank=3, method="gram").fit(np.vstack(blocks))
    assert est.n_samples_seen_ == 90
    assert np.array_equal(est.selected_features_, whole.selected_features_)
    assert est.error_ == pytest.approx(whole.error_, rel=1e-9)


def _layouts(X):
    wide = np.zeros((X.shape[0], 2 * X.shape[1]))
    wide[:, ::2] = X
    return {"C": X, "F": np.asfortranarray(X), "strided": wide[:, ::2],
            "rows": np.repeat(X, 2, axis=0)[::2]}


@pytest.mark.parametrize("params", [dict(rank=50), dict(tol=0.3)])
def test_a_fit_read_in_place_matches_the_streamed_one_in_every_layout(params):
    X = low_rank(600, 200, 60, seed=16, noise=0.05)  # one panel: the Gram is the product
    streamed = InterpolativeDecomposition(**params, method="gram")
    for part in np.array_split(X, 4):
        streamed.partial_fit(part)
    for name, Y in _layouts(X).items():
        est = InterpolativeDecomposition(**params).fit(Y)
        assert est.method_ == "gram", name
        np.testing.assert_array_equal(est.selected_features_, streamed.selected_features_)
        np.testing.assert_allclose(est.interpolation_matrix_, streamed.interpolation_matrix_,
                                   rtol=0, atol=1e-9)
        assert est.error_ == pytest.approx(streamed.error_, rel=1e-9)
        more = est.partial_fit(Y)  # the fit's statistic goes on accumulating
        assert more.n_samples_seen_ == 1200
        np.testing.assert_array_equal(more.selected_features_, streamed.selected_features_)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_fit_read_in_place_refuses_non_finite_data(bad):
    X = low_rank(600, 200, 60, seed=17, noise=0.05)
    X[311, 117] = bad
    for Y in _layouts(X).values():
        with pytest.raises(ValueError, match="NaN|infinit"):
            InterpolativeDecomposition(rank=50).fit(Y)


@pytest.mark.parametrize("scale", [1e-200, 1e200])
def test_a_fit_read_in_place_scales_extreme_data(scale):
    X = low_rank(600, 200, 60, seed=18, noise=0.05)
    reference = InterpolativeDecomposition(rank=50).fit(X)
    est = InterpolativeDecomposition(rank=50).fit(X * scale)
    np.testing.assert_array_equal(est.selected_features_, reference.selected_features_)
    np.testing.assert_allclose(est.interpolation_matrix_, reference.interpolation_matrix_,
                               rtol=0, atol=1e-9)


def test_a_parameter_value_met_before_is_told_from_one_of_another_type():
    X = np.ones((4, 4))
    InterpolativeDecomposition(rank=1).fit(X)  # 1 met the constraints; True equals 1
    with pytest.raises(InvalidParameterError, match="'rank' parameter"):
        InterpolativeDecomposition(rank=True).fit(X)
    with pytest.raises(InvalidParameterError, match="'tol' parameter"):
        InterpolativeDecomposition(tol=float("nan")).fit(X)


def test_the_parameter_check_keeps_no_model_alive():
    # only plain values are remembered as met: a model passed as a parameter is released
    import gc
    import weakref

    import torch

    from skid import NetworkCompressor

    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    alive = weakref.ref(model)
    NetworkCompressor(model=model, rank=0.5).fit(torch.randn(64, 4))
    del model
    gc.collect()
    assert alive() is None
