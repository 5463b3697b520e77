"""The one rule policy (skid._policy) and that both estimators follow it."""

import numpy as np
import pytest

from skid import InterpolativeDecomposition, _policy
from skid._linalg import PivotedFactorization


def low_rank(n, m, r, seed=0, noise=0.0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, r)) @ rng.standard_normal((r, m))
    return (X + noise * rng.standard_normal((n, m))).astype(dtype)


def fake_fac(errors, trusted_rank, n_samples=None, float32_products=True):
    errors = np.asarray(errors, dtype=float)
    m = errors.size - 1
    return PivotedFactorization(
        np.arange(m), np.eye(m), 1.0, errors, trusted_rank, n_samples, float32_products
    )


# The rule table: request → route of method="auto" and the Gram's products, for float32 data.
# (tol, width request) → (route, precision)
RULES = [
    (dict(tol=0.3), ("gram", "native")),
    (dict(tol=1e-2), ("gram", "native")),
    (dict(tol=1e-3), ("gram", "native")),
    (dict(tol=5e-4), ("gram", "float64")),
    (dict(tol=1e-4), ("gram", "float64")),
    (dict(tol=5e-5), ("qr", "float64")),
    (dict(tol=0.0), ("qr", "float64")),
    (dict(width=True), ("gram", "native")),
]


@pytest.mark.parametrize("request_, expected", RULES)
def test_rule_table(request_, expected):
    tol = request_.get("tol")
    width = request_.get("width", False)
    route = _policy.exact_route(tol)
    precision = _policy.gram_precision(float32_data=True, tol=tol, width_request=width)
    assert (route, precision) == expected
    assert _policy.gram_precision(float32_data=False, tol=tol, width_request=width) == "float64"


@pytest.mark.parametrize("request_, expected", [r for r in RULES if "tol" in r[0]])
def test_both_estimators_follow_the_rule_table(request_, expected):
    torch = pytest.importorskip("torch")
    from skid.nn import NetworkCompressor

    tol = request_["tol"]
    X = low_rank(300, 24, 24, seed=1, dtype=np.float32)
    est = InterpolativeDecomposition(tol=tol).fit(X)
    assert (est.method_, est._gram_precision) == expected
    model = torch.nn.Sequential(torch.nn.Linear(24, 24), torch.nn.Linear(24, 3))
    nc = NetworkCompressor(model, tol=tol).fit(torch.as_tensor(X))
    assert (nc.method_, nc._settings.precision) == expected


def test_numerical_rank_and_randomized_rules():
    assert _policy.exact_route(None, numerical_rank=True) == "qr"
    assert _policy.exact_route(None, numerical_rank=False) == "gram"
    assert _policy.gram_precision(float32_data=True, tol=None, width_request=False) == "float64"
    assert _policy.prefers_randomized(128, 1024)
    assert not _policy.prefers_randomized(129, 1024)
    assert not _policy.prefers_randomized(10, 1023)
    assert not _policy.prefers_randomized(None, 4096)


@pytest.mark.parametrize(
    "fraction, width, kept",
    [(0.28, 25, 7), (0.1, 30, 3), (0.55, 10, 6), (0.01, 8, 1), (1.0, 16, 16), (0.5, 1, 1),
     (0.3, 10, 3), (0.7, 10, 7), (1 / 3, 9, 3), (0.26, 25, 7)],
)  # fmt: skip
def test_fraction_to_width(fraction, width, kept):
    assert _policy.width_for_fraction(fraction, width) == kept
    assert _policy.widths_for_fraction(fraction, [width]).tolist() == [kept]


def test_a_fraction_keeps_the_same_count_in_both_estimators():
    torch = pytest.importorskip("torch")
    from skid.nn import NetworkCompressor

    X = low_rank(200, 25, 25, seed=2)
    assert InterpolativeDecomposition(rank=0.28).fit(X).rank_ == 7
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(25, 25), torch.nn.Linear(25, 3))
    nc = NetworkCompressor(model, rank=0.28).fit(torch.as_tensor(X, dtype=torch.float32))
    assert nc.layers_[0]["width_after"] == 7


def test_tol_to_width():
    errors = [1.0, 0.5, 0.1, 0.01, 0.0]
    assert [_policy.width_for_tol(errors, t) for t in (0.6, 0.5, 0.05, 0.0)] == [1, 1, 3, 4]
    assert _policy.width_for_tol(np.zeros(4), 0.0) == 1


# (errors at k, k, trusted rank, rows, route that ran, width request) → finer route
ESCALATIONS = [
    # a width whose error is within reach stays
    (0.05, 4, 10, 100, ("gram", "native"), True, None),
    # a width below float32 products' reach → float64 products, below the Gram's → QR
    (5e-4, 4, 10, 100, ("gram", "native"), True, ("gram", "float64")),
    (5e-4, 4, 10, 100, ("gram", "float64"), True, None),
    (5e-5, 4, 10, 100, ("gram", "float64"), True, ("qr", "float64")),
    (5e-5, 4, 10, 100, ("gram", "native"), True, ("qr", "native")),
    # a tol request only needs errors[k] <= tol: its small error is not re-checked
    (5e-5, 4, 10, 100, ("gram", "native"), False, None),
    # past the pivots clear of rounding while the rows allow more: unresolved, for tol too
    (0.05, 12, 10, 100, ("gram", "native"), False, ("gram", "float64")),
    (0.05, 12, 10, 100, ("gram", "float64"), False, ("qr", "float64")),
    # past them because the rows run out: no route does better
    (0.05, 12, 10, 10, ("gram", "native"), True, None),
    # QR is the finest; every column kept is exact on any route
    (0.0, 4, 10, 100, ("qr", "float64"), True, None),
    (0.0, 16, 16, 100, ("gram", "native"), True, None),
]


@pytest.mark.parametrize("error, k, trusted, rows, ran, width_request, finer", ESCALATIONS)
def test_escalation_table(error, k, trusted, rows, ran, width_request, finer):
    errors = np.linspace(1.0, 0.0, 17)
    errors[k] = error
    fac = fake_fac(errors, trusted, rows)
    method, precision = ran
    got = _policy.finer_route(
        fac, k, method=method, precision=precision, auto=True, width_request=width_request
    )
    assert got == finer
    manual = _policy.finer_route(
        fac, k, method=method, precision=precision, auto=False, width_request=width_request
    )
    if finer is not None and finer[0] == "qr":  # QR only for method="auto"
        assert manual == (("gram", "float64") if precision == "native" else None)
    else:
        assert manual == finer


def test_native_label_on_float64_products_skips_to_the_gram_rule():
    fac = fake_fac(np.r_[1.0, 5e-4, 0.0], 2, 100, float32_products=False)
    assert (
        _policy.finer_route(fac, 1, method="gram", precision="native", auto=True,
                            width_request=True)  # fmt: skip
        is None
    )


def test_the_compressor_rechecks_like_the_estimators_refit():
    """A width whose error float32 products cannot resolve is recomputed, as in the estimator."""
    torch = pytest.importorskip("torch")
    from skid.nn import NetworkCompressor

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32, bias=False), torch.nn.Linear(32, 4))
    with torch.no_grad():  # activations: rank 3 plus a floor at 1e-5
        model[0].weight.copy_(torch.randn(32, 3) @ torch.randn(3, 64) + 1e-5 * torch.randn(32, 64))
    X = torch.randn(400, 64)
    nc = NetworkCompressor(model, rank=0.25).fit(X)
    with torch.no_grad():
        Z = model[0](X).numpy()
    est = InterpolativeDecomposition(rank=8).fit(Z)
    assert est.method_ == "qr"
    # the float32 Gram alone reported 0.0 here
    assert nc.layers_[0]["error"] == pytest.approx(est.error_, rel=1e-2)
