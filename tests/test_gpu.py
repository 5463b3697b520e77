"""GPU paths: CuPy arrays and CUDA torch tensors stay on their device (skip without CUDA)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from skid import InterpolativeDecomposition  # noqa: E402

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def data(dtype=np.float32):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((5000, 16)) @ rng.standard_normal((16, 64))
    return (X + 1e-3 * rng.standard_normal(X.shape)).astype(dtype)


@needs_cuda
@pytest.mark.parametrize("method", ["gram", "qr"])
def test_cuda_tensor_stays_on_gpu_and_matches_cpu(method):
    X = data()
    cpu = InterpolativeDecomposition(rank=16, method=method).fit(X)
    Xg = torch.as_tensor(X, device="cuda")
    gpu = InterpolativeDecomposition(rank=16, method=method).fit(Xg)
    assert gpu.interpolation_matrix_.is_cuda
    assert gpu.transform(Xg).is_cuda
    assert np.array_equal(np.sort(cpu.selected_features_), np.sort(gpu.selected_features_))
    assert gpu.error_ == pytest.approx(cpu.error_, rel=1e-3)


@needs_cuda
def test_cupy_array_stays_on_gpu():
    cupy = pytest.importorskip("cupy")
    X = cupy.asarray(data(np.float64))
    est = InterpolativeDecomposition(tol=1e-2).fit(X)
    assert isinstance(est.interpolation_matrix_, cupy.ndarray)
    assert isinstance(est.inverse_transform(est.transform(X)), cupy.ndarray)
    assert est.score(X) > 0.99


@needs_cuda
def test_numpy_backend_pulls_gpu_input_to_host():
    Xg = torch.as_tensor(data(), device="cuda")
    est = InterpolativeDecomposition(rank=8, backend="numpy").fit(Xg)
    assert isinstance(est.interpolation_matrix_, np.ndarray)


@pytest.mark.skipif(torch.cuda.is_available(), reason="runs the GPU benchmark itself there")
def test_bench_gpu_skips_cleanly_without_cuda():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, str(root / "benchmarks" / "bench_gpu.py"), "--quick"],
                          capture_output=True, text=True, timeout=120, cwd=root)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "no CUDA GPU here" in done.stdout and "Skipped." in done.stdout
    assert done.stderr == ""
