"""scikit-learn's common estimator checks."""

from sklearn.utils.estimator_checks import parametrize_with_checks

from skid import InterpolativeDecomposition


@parametrize_with_checks(
    [
        InterpolativeDecomposition(),
        InterpolativeDecomposition(rank=0.5),
        InterpolativeDecomposition(tol=1e-2, method="qr"),
    ]
)
def test_sklearn_compatible(estimator, check):
    check(estimator)
