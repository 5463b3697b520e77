"""Dask: the ID reduced blockwise on a cluster, lazy transforms, and grid search on the cluster."""

import subprocess
import sys

import numpy as np
import pytest

from skid import InterpolativeDecomposition

da = pytest.importorskip("dask.array")
distributed = pytest.importorskip("distributed")


def low_rank(n, m, r, seed=0, noise=1e-3, dtype=np.float64):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, r)) @ rng.standard_normal((r, m))
    return (X + noise * rng.standard_normal((n, m))).astype(dtype)


@pytest.fixture(scope="module")
def client():
    """Two worker processes: what the tests compute goes through pickling and the scheduler."""
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        yield client


@pytest.fixture
def never_materialized(monkeypatch):
    """Fail if anything turns a whole Dask array into one NumPy array in this process."""

    def refuse(self, *args, **kwargs):
        raise AssertionError("a Dask array was materialized with np.asarray")

    monkeypatch.setattr(da.Array, "__array__", refuse)


def test_import_skid_does_not_import_dask():
    code = "import sys, skid; skid.InterpolativeDecomposition; print('dask' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.slow
@pytest.mark.parametrize(
    "params",
    [{"tol": 1e-2}, {"rank": 6}, {"tol": 1e-6}, {}, {"rank": 0.2, "method": "qr"}],
    ids=["tol-gram", "rank-gram", "tol-qr", "numerical-rank", "rank-qr"],
)
def test_fit_on_cluster_equals_numpy(client, never_materialized, params):
    X = low_rank(1500, 40, 6)
    chunked = da.from_array(X, chunks=(200, 15))  # column chunks too: joined per row chunk
    with distributed.get_task_stream(client) as stream:
        dask_id = InterpolativeDecomposition(**params).fit(chunked)
    ref = InterpolativeDecomposition(**params).fit(X)
    assert dask_id.method_ == ref.method_
    np.testing.assert_array_equal(dask_id.selected_features_, ref.selected_features_)
    np.testing.assert_allclose(dask_id.interpolation_matrix_, ref.interpolation_matrix_, atol=1e-8)
    assert dask_id.error_ == pytest.approx(ref.error_, rel=1e-6, abs=1e-12)
    assert dask_id.n_samples_seen_ == 1500
    assert any("_chunk_statistic" in str(task["key"]) for task in stream.data)


@pytest.mark.slow
def test_float32_and_partial_fit_on_cluster(client, never_materialized):
    X = low_rank(1200, 30, 5, seed=1, dtype=np.float32)
    ref = InterpolativeDecomposition(rank=5).fit(X)
    dask_id = InterpolativeDecomposition(rank=5).fit(da.from_array(X, chunks=(250, 30)))
    np.testing.assert_array_equal(dask_id.selected_features_, ref.selected_features_)
    assert dask_id.interpolation_matrix_.dtype == np.float32
    np.testing.assert_allclose(dask_id.interpolation_matrix_, ref.interpolation_matrix_, atol=1e-5)

    X = X.astype(np.float64)
    streamed = InterpolativeDecomposition(tol=1e-2)
    for start in range(0, 1200, 500):
        streamed.partial_fit(da.from_array(X[start : start + 500], chunks=(120, 30)))
    ref = InterpolativeDecomposition(tol=1e-2).fit(X)
    assert streamed.n_samples_seen_ == 1200
    np.testing.assert_array_equal(streamed.selected_features_, ref.selected_features_)
    T, T_ref = streamed.interpolation_matrix_, ref.interpolation_matrix_
    np.testing.assert_allclose(T, T_ref, atol=1e-8)


@pytest.mark.slow
def test_transform_and_inverse_transform_stay_lazy(client):
    X = low_rank(600, 20, 4, seed=2)
    chunked = da.from_array(X, chunks=(100, 20))
    est = InterpolativeDecomposition(rank=4).fit(chunked)
    selected = est.transform(chunked)
    restored = est.inverse_transform(selected)
    assert isinstance(selected, da.Array) and isinstance(restored, da.Array)
    assert selected.shape == (600, 4) and restored.shape == (600, 20)
    np.testing.assert_array_equal(selected.compute(), X[:, est.selected_features_])
    expected = X[:, est.selected_features_] @ est.interpolation_matrix_
    np.testing.assert_allclose(restored.compute(), expected)
    assert est.score(chunked) == pytest.approx(est.score(X), abs=1e-12)


def test_lazily_generated_array_is_reduced_per_chunk(never_materialized):
    """A chunked array that exists nowhere whole (generated per chunk) on the local scheduler."""
    X = da.random.default_rng(0).standard_normal((4000, 12), chunks=(500, 12))
    est = InterpolativeDecomposition(rank=3).fit(X)
    assert est.rank_ == 3 and est.n_samples_seen_ == 4000


def test_nan_in_a_chunk_is_reported():
    X = low_rank(300, 8, 3)
    X[250, 2] = np.nan
    chunked = da.from_array(X, chunks=(100, 8))
    with pytest.raises(ValueError, match="NaN or infinity"):
        InterpolativeDecomposition(tol=1e-2).partial_fit(chunked)
    with pytest.raises(ValueError, match="NaN"):
        InterpolativeDecomposition(tol=1e-2).fit(chunked)


def test_unknown_chunk_sizes_and_randomized_are_rejected():
    X = da.from_array(low_rank(300, 8, 3), chunks=(100, 8))
    masked = X[X[:, 0] > 0]
    with pytest.raises(ValueError, match="compute_chunk_sizes"):
        InterpolativeDecomposition(rank=2).fit(masked)
    with pytest.raises(ValueError, match="does not run on Dask"):
        InterpolativeDecomposition(rank=2, method="randomized").fit(X)
    wide = da.random.default_rng(1).standard_normal((60, 2048), chunks=(30, 2048))
    est = InterpolativeDecomposition(rank=4).fit(wide)  # "auto" never picks randomized here
    assert est.method_ == "gram"


@pytest.mark.slow
def test_grid_search_on_the_cluster_equals_n_jobs_1(client, tmp_path):
    """GridSearchCV(n_jobs=-1) under joblib's Dask backend: the candidates run on the workers."""
    import joblib
    import torch
    from sklearn.model_selection import GridSearchCV, KFold

    from skid import NetworkCompressor, metrics

    from .nn.models import make_mlp

    torch.manual_seed(0)
    X = torch.randn(120, 8)
    grid = {"tol": [0.02, 0.1, 0.3], "calibration": ["original", "sequential"]}
    scoring = {"agreement": metrics.agreement, "flops": metrics.flops_kept}

    def search(n_jobs, memory=None):
        compressor = NetworkCompressor(make_mlp(), batch_size=32, memory=memory)
        return GridSearchCV(
            compressor, grid, scoring=scoring, refit="agreement", cv=KFold(2), n_jobs=n_jobs
        ).fit(X)

    serial = search(1)
    # memory= on a path the workers share: statistics are computed once per fold, then read
    with joblib.parallel_backend("dask"), distributed.get_task_stream(client) as stream:
        parallel = search(-1, memory=str(tmp_path / "cache"))
    assert stream.data, "nothing ran on the cluster"
    for key in ("mean_test_agreement", "mean_test_flops", "rank_test_agreement"):
        np.testing.assert_allclose(parallel.cv_results_[key], serial.cv_results_[key], atol=1e-12)
    assert parallel.best_params_ == serial.best_params_
    assert any((tmp_path / "cache").rglob("output.pkl")), "the workers wrote no cache entry"
