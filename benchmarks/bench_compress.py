"""Cost of NetworkCompressor.fit against plain forward passes, peak memory, grid search.

Three tables, every peer measured in the same run:

1. ``fit`` time ÷ the time of ONE plain forward pass (eval, no_grad, same batches) over the
   same 2,000 calibration images, for the trained digits CNN (1×8×8) and a VGG-style CNN at
   3×32×32 (random init), with ``calibration="original"`` (target ≤ 1.5×), ``"sequential"``
   (one truncated pass per unit) and ``"corrective"`` (two per unit: the original and the
   compressed model; one for the first unit); medians of rounds that interleave the forward
   pass and the fit. Then where the fit's time goes, in forward passes.
2. Peak resident memory of a ``fit`` against the calibration size, one fresh subprocess per
   size (torch's CPU allocations are invisible to tracemalloc; the resident set sees them):
   the fit's peak above its starting point, next to that of a plain forward pass over the
   same data, should stay flat.
3. A 10-tolerance ``GridSearchCV`` (one split: 2,000 calibration images, 400 to score) with
   ``memory=`` against a single fit on the 2,000 images (target ≤ 2×), and the number of
   calibration forward passes (batches) each ran.

    python benchmarks/bench_compress.py            # full run (about 3 minutes, 1 thread)
    python benchmarks/bench_compress.py --quick    # smoke run (seconds)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc

import joblib
import numpy as np
import torch
from _models import (
    digits_images,
    forward_pass,
    make_vgg32,
    median_time,
    peak_above_start,
    peak_ratio,
    print_table,
    set_threads,
    status_mib,
    stopwatch,
    train_digits_cnn,
)
from sklearn.model_selection import GridSearchCV, PredefinedSplit

from skid import NetworkCompressor, _corrective, metrics
from skid.model_selection import most_compressed
from skid.nn import _calibration, _compressor, _unit_kinds
from skid.nn._calibration import calibration_passes

BATCH_SIZE = 256
TOL = 0.05

# Functions fit calls, wrapped with a stopwatch for the breakdown (module, attribute, phase).
PHASES = [
    (_compressor, "_working_copy", "copy"),
    (_compressor, "find_all_units", "walk"),
    (_compressor, "count_flops", "flops"),
    (_calibration, "unit_statistics", "calibration"),
    (_calibration, "corrective_statistics", "calibration"),
    (_calibration, "_factorize", "factorize"),
    (_corrective.CrossStatistics, "factorize", "corrective factorize"),
    (_unit_kinds, "apply_selection", "surgery"),
]


def models(n_images, quick):
    """``{name: (model, images(n, seed))}``: the trained digits CNN and a VGG (random init)."""
    digits_cnn, _ = train_digits_cnn()
    channels = (8, 16, 32) if quick else (32, 64, 128)

    def vgg_images(n, seed):
        return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))

    return {
        "digits CNN 1×8×8": (digits_cnn, digits_images),
        f"VGG {'-'.join(map(str, channels))} 3×32×32": (make_vgg32(channels), vgg_images),
    }


# ------------------------------------------------------------------------ 1. fit ÷ forward


@contextlib.contextmanager
def phase_timers():
    """Wrap the functions of PHASES so each call adds its wall time to the yielded dict."""
    times, saved = {}, []

    def timed(fn, phase):
        def wrapper(*args, **kwargs):
            with stopwatch(times, phase):
                return fn(*args, **kwargs)
        return wrapper

    for module, name, phase in PHASES:
        original = getattr(module, name)
        saved.append((module, name, original))
        setattr(module, name, timed(original, phase))
    try:
        yield times
    finally:
        for module, name, original in saved:
            setattr(module, name, original)


def time_fit(model, X, tol, calibration, rounds):
    """Medians over rounds of: forward pass, fit, and the fit's phases (seconds)."""
    forward, fit, phases = [], [], []
    forward_pass(model, X[:BATCH_SIZE])  # warm-up
    for _ in range(rounds):
        forward.append(median_time(lambda: forward_pass(model, X, BATCH_SIZE), 1))
        nc = NetworkCompressor(model, tol=tol, calibration=calibration, batch_size=BATCH_SIZE)
        with phase_timers() as times:
            start = time.perf_counter()
            nc.fit(X)
            fit.append(time.perf_counter() - start)
        times["calibration"] -= times.get("factorize", 0.0)  # factorize runs inside it
        times["factorize"] = times.get("factorize", 0.0) + times.pop("corrective factorize", 0)
        times["other"] = fit[-1] - sum(times.values())
        phases.append(times)
    median_phases = {k: statistics.median(t.get(k, 0.0) for t in phases) for k in phases[0]}
    return statistics.median(forward), statistics.median(fit), median_phases, nc


def bench_fit_time(zoo, n_images, rounds):
    """Table 1 and the breakdown table; ``rounds`` per calibration mode."""
    rows, breakdown = [], []
    for name, (model, images) in zoo.items():
        X = images(n_images, 0)
        for calibration, n_rounds in rounds.items():
            forward, fit, phases, nc = time_fit(model, X, TOL, calibration, n_rounds)
            kept = nc.flops_["after"] / nc.flops_["before"]
            rows.append((name, calibration, len(nc.layers_), forward, fit, fit / forward,
                         nc.n_calibration_passes_, kept))
            breakdown.append((name, calibration, *(phases[k] / forward for k in (
                "walk", "calibration", "factorize", "surgery", "copy", "flops", "other"))))
    print_table(
        f"fit time ÷ one plain forward pass over the same {n_images} images (batches of "
        f"{BATCH_SIZE}, tol={TOL}, medians of {rounds['original']} rounds, sequential and "
        f"corrective {rounds['sequential']}; target ≤ 1.5× for original)",
        ["model", "calibration", "units", "forward s", "fit s", "fit ÷ forward",
         "calib. batches", "FLOPs kept"],
        rows, ["s", "s", "d", ".3f", ".3f", ".2f", "d", ".2f"],
    )
    print_table(
        "where fit's time goes, in plain forward passes (medians)",
        ["model", "calibration", "graph walk", "calibration pass", "factorize", "surgery",
         "deep copy", "FLOP count", "other"],
        breakdown, ["s", "s", *[".3f"] * 7],
    )


# ------------------------------------------------------------------------- 2. peak memory


def memory_child(n_images, channels, threads):
    """Run in a fresh process: peak memory of a forward pass and of a fit (JSON on stdout)."""
    set_threads(threads)
    model = make_vgg32(channels)
    X = torch.randn(n_images, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    NetworkCompressor(model, tol=TOL).fit(X[:8])  # one-time imports and caches, tiny batch
    forward = peak_above_start(lambda: forward_pass(model, X, BATCH_SIZE))
    tracemalloc.start()
    fit = peak_above_start(
        lambda: NetworkCompressor(model, tol=TOL, batch_size=BATCH_SIZE).fit(X))
    heap = tracemalloc.get_traced_memory()[1] / 2**20
    print(json.dumps({"data": X.numel() * X.element_size() / 2**20, "rss": status_mib("VmRSS"),
                      "forward": forward, "fit": fit, "heap": heap}))


def bench_memory(sizes, channels, threads):
    """Table 2: one subprocess per calibration size."""
    if not os.access("/proc/self/clear_refs", os.W_OK):
        print("\npeak memory vs calibration size: skipped (needs Linux's /proc/self/clear_refs)")
        return
    # glibc keeps freed blocks below a moving mmap threshold; a fixed one returns every large
    # block on free, so the resident set follows live memory and peaks are comparable
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    rows, first = [], None
    for n in sizes:
        command = [sys.executable, __file__, "--memory-child", str(n),
                   "--channels", ",".join(map(str, channels)), "--threads", str(threads)]
        out = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        first = r["fit"] if first is None else first
        rows.append((n, r["data"], r["rss"], r["forward"], r["fit"],
                     peak_ratio(r["fit"], r["forward"]), peak_ratio(r["fit"], first), r["heap"]))
    print_table(
        f"peak memory vs calibration size, VGG {'-'.join(map(str, channels))} 3×32×32, batches "
        f"of {BATCH_SIZE}, one fresh process per size (resident set above its value at the "
        "start of the call, MiB)",
        ["images", "data MiB", "process RSS", "forward pass peak", "fit peak",
         "fit ÷ forward", f"fit ÷ fit at {sizes[0]}", "Python-heap peak of fit"],
        rows, ["d", ".1f", ".0f", ".1f", ".1f", ".2f", ".2f", ".2f"],
    )


# -------------------------------------------------------------------------- 3. grid search


def grid_search_once(model, X_all, split, tols, cache_dir):
    """A 10-tolerance search; its wall time, fit/score/refit times and calibration batches."""
    search = GridSearchCV(
        NetworkCompressor(model, memory=joblib.Memory(cache_dir, verbose=0),
                          batch_size=BATCH_SIZE),
        {"tol": list(tols)},
        scoring={"agreement": metrics.agreement, "flops": metrics.flops_kept},
        refit=most_compressed(0.99),
        cv=split,
    )
    passes = calibration_passes()
    start = time.perf_counter()
    search.fit(X_all)
    total = time.perf_counter() - start
    results = search.cv_results_
    return {"total": total, "fits": float(np.sum(results["mean_fit_time"])),
            "scoring": float(np.sum(results["mean_score_time"])), "refit": search.refit_time_,
            "batches": calibration_passes() - passes,
            "best_tol": search.best_params_["tol"]}


def bench_grid(zoo, n_images, n_score, rounds):
    """Table 3: GridSearchCV with memory= against one fit on the calibration split."""
    tols = np.geomspace(0.01, 0.4, 10).round(4)
    rows = []
    for name, (model, images) in zoo.items():
        X = images(n_images, 0)
        X_all = torch.cat([X, images(n_score, 1)])
        split = PredefinedSplit(np.r_[np.full(len(X), -1), np.zeros(n_score, int)])
        single, searches = [], []
        one_fit = NetworkCompressor(model, tol=TOL, batch_size=BATCH_SIZE)
        for _ in range(rounds):
            passes = calibration_passes()
            single.append(median_time(lambda: one_fit.fit(X), 1))  # noqa: B023
            single_batches = calibration_passes() - passes
            with tempfile.TemporaryDirectory() as cache_dir:
                searches.append(grid_search_once(model, X_all, split, tols, cache_dir))
        fit = statistics.median(single)
        med = {k: statistics.median(s[k] for s in searches)
               for k in ("total", "fits", "scoring", "refit")}
        rows.append((name, fit, med["fits"], med["fits"] / fit, med["total"],
                     med["total"] / fit, med["scoring"], med["refit"], single_batches,
                     searches[-1]["batches"], f"{searches[-1]['best_tol']:g}"))
    print_table(
        f"GridSearchCV over {len(tols)} tolerances ({tols.min():g} … {tols.max():g}), "
        f"memory=joblib.Memory, 1 split ({n_images} calibration + {n_score} scoring images), "
        f"refit=most_compressed(0.99), medians of {rounds} rounds (target: search ≤ 2× fit)",
        ["model", "one fit s", "10 fits in search s", "÷ one fit", "whole search s",
         "÷ one fit", "scoring s", "refit s", "calib. batches: one fit", "search",
         "best tol"],
        rows, ["s", ".3f", ".3f", ".2f", ".3f", ".2f", ".3f", ".3f", "d", "d", "s"],
    )


# ------------------------------------------------------------------------------------ main


def blas_threads() -> str:
    """The BLAS libraries NumPy/SciPy loaded and their thread counts."""
    from threadpoolctl import threadpool_info

    return ", ".join(f"{i['internal_api']} ×{i['num_threads']}" for i in threadpool_info()
                     if i["user_api"] == "blas") or "none found"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 300 images, a narrow VGG, 1 round, 2 memory sizes")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of table 1")
    parser.add_argument("--sequential-rounds", type=int, default=1,
                        help="rounds of table 1 for calibration='sequential' and 'corrective'")
    parser.add_argument("--grid-rounds", type=int, default=3, help="rounds of table 3")
    parser.add_argument("--score-images", type=int, default=400,
                        help="images the grid search scores on")
    parser.add_argument("--images", type=int, default=2000, help="calibration images")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; 0: torch's default (2 threads thrash on a shared "
                             "2-core machine)")
    parser.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--channels", default="32,64,128", help=argparse.SUPPRESS)
    args = parser.parse_args()
    threads = set_threads(args.threads)
    if args.memory_child:
        memory_child(args.memory_child, tuple(map(int, args.channels.split(","))), threads)
        return
    n_images = 300 if args.quick else args.images
    rounds = {"original": args.rounds, "sequential": args.sequential_rounds,
              "corrective": args.sequential_rounds}
    grid_rounds, n_score = args.grid_rounds, args.score_images
    if args.quick:
        rounds, grid_rounds, n_score = dict.fromkeys(rounds, 1), 1, 100
    print(f"torch {torch.__version__}, {threads} torch threads; BLAS: {blas_threads()}")
    zoo = models(n_images, args.quick)
    bench_fit_time(zoo, n_images, rounds)
    channels = (8, 16, 32) if args.quick else (32, 64, 128)
    sizes = (250, 500) if args.quick else (500, 1000, 2000, 4000)
    bench_memory(sizes, channels, threads)
    bench_grid(zoo, n_images, n_score, grid_rounds)


if __name__ == "__main__":
    main()
