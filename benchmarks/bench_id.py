"""Speed and accuracy of skid's ID against SciPy and LAPACK, peers measured in the same run.

First the floor: ``InterpolativeDecomposition(rank=m/4).fit`` and the Gram route's three steps
(accumulate, factorize, select) as ``fit`` runs them (the factorization stops at the rank's
pivots), with LAPACK's whole ``dpstrf`` instead (the previous factorization), and with the
previous products too (panel by panel, after a pass that checks each block), each ÷ one
``X.T @ X`` of the same
array (the n·m² floor every exact ID pays to read X once), on NumPy and torch CPU arrays in
float64 and float32, the variants interleaved round by round (medians). Then, for
activation-like matrices ``relu(G @ W) + noise`` (n × m, k = m/4), per dtype: time (median of
rounds), relative Frobenius error, time ratio to SciPy's deterministic ID, the achieved rate
n·m²/time in GFLOP/s and the time ratio to a same-run ``XᵀX``. Then peak memory of
``partial_fit`` against n.

On a machine shared with other jobs wall times swing; ``--threads 1 --cpu-time`` measures the
process's CPU time on one thread, which other jobs disturb far less (the load is printed).

    python benchmarks/bench_id.py            # 20,000×256 and 100,000×512
    python benchmarks/bench_id.py --quick    # 20,000×256 only, fewer rounds
    python benchmarks/bench_id.py --floor-only --threads 1 --cpu-time
    python benchmarks/bench_id.py --pivots --threads 1 --cpu-time   # leading pivots vs dpstrf
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import tracemalloc

import numpy as np
import scipy.linalg
import scipy.linalg.interpolative as sli
import torch
from _models import print_table, set_threads
from scipy.linalg import lapack

from skid import InterpolativeDecomposition
from skid._linalg import GramAccumulator
from skid._linalg._leading import early_pivot_limit, leading_pivots

CLOCK = {"wall": time.perf_counter, "cpu": time.process_time}


def activation_like(n, m, dtype, seed=0):
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((n, m // 4), dtype=np.float32)
    X = np.maximum(latent @ rng.standard_normal((m // 4, m), dtype=np.float32), 0)
    X += 0.05 * rng.standard_normal((n, m), dtype=np.float32)
    return X.astype(dtype)


def rel_error(X, selected, T):
    X64 = X.astype(np.float64, copy=False)
    return float(np.linalg.norm(X64 - X64[:, selected] @ T) / np.linalg.norm(X64))


def skid_runner(method):
    def run(X, k):
        est = InterpolativeDecomposition(rank=k, method=method, random_state=0).fit(X)
        return est.selected_features_, np.asarray(est.interpolation_matrix_, dtype=np.float64)

    return run


def scipy_runner(rand):
    def run(X, k):
        idx, proj = sli.interp_decomp(np.asfortranarray(X, dtype=np.float64), k, rand=rand)
        T = np.hstack([np.eye(k), proj])[:, np.argsort(idx)]
        return idx[:k], T

    return run


def geqp3_runner(X, k):
    R, piv = scipy.linalg.qr(X, mode="r", pivoting=True, check_finite=False)
    T = np.zeros((k, X.shape[1]))
    T[:, piv] = np.hstack(
        [np.eye(k), scipy.linalg.solve_triangular(R[:k, :k], R[:k, k:])]
    )
    return piv[:k], T


def timed(fn, X, k, rounds):
    times, result = [], None
    for _ in range(rounds):
        start = time.perf_counter()
        result = fn(X, k)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def gemm_floor(X, rounds):
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        X.T @ X
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def gram_id(X, k, products, leading=True):
    """The Gram route's steps as ``fit`` runs them for a rank (float32 data: float32
    products, as the policy chooses), with the accumulator's ``products``; ``leading``: the
    factorization stops at the rank's pivots (else LAPACK's whole ``dpstrf``, as before)."""
    float32 = str(X.dtype).endswith("float32")
    acc = GramAccumulator("native" if float32 else "float64", products).update(X)
    return acc.factorize(consume=True, rank=k if leading else None).select(k)


def interleaved(ways, rounds, clock):
    """Median time of each way, the ways run one after the other in every round."""
    times = {name: [] for name in ways}
    for _ in range(rounds):
        for name, fn in ways.items():
            start = clock()
            fn()
            times[name].append(clock() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def floor_table(n, m, rounds, clock_name):
    """The ID and its accumulator (current and previous products) ÷ one ``X.T @ X``."""
    k, rows = m // 4, []
    for library in ("numpy", "torch"):
        for dtype in (np.float64, np.float32):
            X = activation_like(n, m, dtype)
            if library == "torch":
                X = torch.from_numpy(X)
            ways = {
                "floor": lambda X=X: X.T @ X,
                "fit": lambda X=X: InterpolativeDecomposition(rank=k).fit(X),
                "new": lambda X=X: gram_id(X, k, "auto"),
                "dpstrf": lambda X=X: gram_id(X, k, "auto", leading=False),
                "previous": lambda X=X: gram_id(X, k, "panels", leading=False),
            }
            med = interleaved(ways, rounds, CLOCK[clock_name])
            floor = med["floor"]
            rows.append((library, np.dtype(dtype).name, floor * 1e3, med["fit"] / floor,
                         med["new"] / floor, med["dpstrf"] / floor, med["previous"] / floor,
                         med["dpstrf"] / med["new"]))
    print_table(
        f"{n}×{m}, rank {k}: time ÷ one X.T @ X of the same array ({clock_name} time, median "
        f"of {rounds} interleaved rounds, {torch.get_num_threads()} torch thread(s)); "
        "steps = accumulate + factorize + select; leading = the factorization stops at the "
        "rank's pivots; whole dpstrf = all m pivots (the previous factorization); previous "
        "panels = also the previous accumulator",
        ["library", "dtype", "X.T @ X ms", "fit ÷ floor", "steps, leading ÷ floor",
         "steps, whole dpstrf ÷ floor", "steps, previous panels ÷ floor",
         "whole dpstrf ÷ leading"],
        rows, ["s", "s", ".1f", ".3f", ".3f", ".3f", ".3f", ".3f"],
    )


def pivots_table(sizes, rounds, clock_name):
    """The leading pivots (the NumPy loop that stops at k) against LAPACK's whole ``dpstrf``
    of the same Gram, per m and k; the loop's default limit is where it still wins."""
    rows = []
    for m in sizes:
        X = activation_like(4 * m, m, np.float64)
        G = np.asfortranarray(X.T @ X)
        G /= G.diagonal().max()
        sq_norm, cutoff = float(np.trace(G)), m * np.finfo(np.float64).epsneg
        ways = {"dpstrf": lambda G=G: lapack.dpstrf(G.copy(order="F"), tol=-1.0),
                "dpotrf": lambda G=G: lapack.dpotrf(G.copy(order="F"))}
        fractions = (8, 4, 2, 4 / 3, 1)
        for f in fractions:
            ways[f] = lambda G=G, k=int(m / f), c=cutoff, t=sq_norm: leading_pivots(G, k, c, t)
        med = interleaved(ways, rounds if m <= 512 else max(1, rounds // 3), CLOCK[clock_name])
        rows.append((m, early_pivot_limit(m), med["dpstrf"] * 1e3, med["dpotrf"] * 1e3,
                     *(med[f] / med["dpstrf"] for f in fractions)))
    print_table(
        f"Pivoted Cholesky of an m × m Gram: the first k pivots (NumPy loop) ÷ LAPACK's "
        f"whole dpstrf ({clock_name} time, medians)",
        ["m", "loop's limit", "dpstrf ms", "dpotrf ms", "k = m/8", "k = m/4", "k = m/2",
         "k = 3m/4", "k = m"],
        rows, ["d", "d", ".2f", ".2f", ".3f", ".3f", ".3f", ".3f", ".3f"],
    )


def bench_shape(n, m, dtype, rounds, scipy_rounds):
    X = activation_like(n, m, dtype)
    k = m // 4
    floor = gemm_floor(X, rounds)
    runners = {f"skid {method}": (skid_runner(method), rounds)
               for method in ("auto", "gram", "qr", "randomized")}
    runners["LAPACK geqp3 on X"] = (geqp3_runner, max(1, scipy_rounds))
    runners["scipy ID rand=True"] = (scipy_runner(True), scipy_rounds)
    runners["scipy ID rand=False"] = (scipy_runner(False), scipy_rounds)
    rows = {}
    for name, (fn, r) in runners.items():
        seconds, (selected, T) = timed(fn, X, k, r)
        rows[name] = (seconds, rel_error(X, selected, T))
    scipy_time = rows["scipy ID rand=False"][0]
    flops = n * m * m
    print(f"\n{n}×{m} {np.dtype(dtype).name}, k={k}; XᵀX floor {floor * 1e3:.1f} ms "
          f"({flops / floor / 1e9:.1f} GFLOP/s)")
    print(f"{'method':22s} {'time s':>9s} {'rel. error':>11s} {'× faster than SciPy':>20s} "
          f"{'GFLOP/s':>8s} {'÷ floor':>8s}")
    for name, (seconds, err) in rows.items():
        print(f"{name:22s} {seconds:9.3f} {err:11.5f} {scipy_time / seconds:20.1f} "
              f"{flops / seconds / 1e9:8.1f} {seconds / floor:8.2f}")


def partial_fit_memory(m=256, block=2000, sizes=(20_000, 80_000, 320_000)):
    print(f"\npartial_fit peak Python-heap memory, m={m}, blocks of {block} rows (float32)")
    print(f"{'n_samples':>10s} {'peak MiB':>9s}")
    X_block = activation_like(block, m, np.float32)
    for n in sizes:
        est = InterpolativeDecomposition(tol=1e-2)
        tracemalloc.start()
        for _ in range(n // block):
            est.partial_fit(X_block)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        print(f"{n:10d} {peak / 2**20:9.1f}")


def rule_table(m, n, rounds, clock_name):
    """``GramAccumulator.factorize`` with a width rule (rank or tol) against the whole
    factorization of the same statistic, on ReLU features of a rank-m/4 signal (an FFN-like
    input: most columns needed at small tol)."""
    rng = np.random.default_rng(0)
    Z = rng.standard_normal((n, m // 4)) @ rng.standard_normal((m // 4, m)) * 0.5
    acc = GramAccumulator().update(np.maximum(Z, 0) + 0.02 * rng.standard_normal((n, m)))
    whole = acc.factorize()
    rules = [{"rank": m // 16}, {"rank": m // 8}, {"rank": m // 4}, {"rank": m // 2},
             {"tol": 0.5}, {"tol": 0.3}, {"tol": 0.1}, {"tol": 0.05}]
    ways = {"whole": acc.factorize}
    for i, rule in enumerate(rules):
        ways[i] = lambda rule=rule: acc.factorize(**rule)
    med = interleaved(ways, rounds, CLOCK[clock_name])
    rows = []
    for i, rule in enumerate(rules):
        k = rule.get("rank") or whole.rank_for_tol(rule["tol"])
        rows.append((str(rule), k, med[i] * 1e3, med[i] / med["whole"]))
    print_table(
        f"GramAccumulator.factorize(rule) on {n}×{m} ReLU features against the whole "
        f"factorization ({med['whole'] * 1e3:.1f} ms; {clock_name} time, median of {rounds})",
        ["rule", "width", "ms", "÷ whole"], rows, ["s", "d", ".1f", ".2f"],
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only the 20,000×256 shape")
    parser.add_argument("--rounds", type=int, default=5, help="rounds for the fast methods")
    parser.add_argument("--scipy-rounds", type=int, default=1, help="rounds for SciPy/geqp3")
    parser.add_argument("--floor-rounds", type=int, default=None,
                        help="interleaved rounds of the floor table (default 9, --quick 3)")
    parser.add_argument("--floor-only", action="store_true", help="only the floor table")
    parser.add_argument("--pivots", action="store_true",
                        help="only the leading pivots against dpstrf, m = 64 … 2,048")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch and BLAS threads (0: leave as they are)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="process CPU time instead of wall time (use with --threads 1)")
    args = parser.parse_args()
    set_threads(args.threads)
    print("load average before (1, 5, 15 min):", os.getloadavg())
    try:
        from threadpoolctl import threadpool_info

        blas = [(i["internal_api"], i["num_threads"]) for i in threadpool_info()]
        print("BLAS:", blas)
    except ImportError:
        pass
    if args.pivots:
        sizes = (64, 128, 256, 512) if args.quick else (64, 128, 256, 512, 1024, 1536, 2048)
        pivots_table(sizes, args.floor_rounds or 5, "cpu" if args.cpu_time else "wall")
        m = 512 if args.quick else 1536
        rule_table(m, 4 * m, args.floor_rounds or 5, "cpu" if args.cpu_time else "wall")
        return
    shapes = [(20_000, 256)] if args.quick else [(20_000, 256), (100_000, 512)]
    floor_rounds = args.floor_rounds or (3 if args.quick else 9)
    for n, m in shapes:
        floor_table(n, m, floor_rounds, "cpu" if args.cpu_time else "wall")
    print("load average after the floor tables:", os.getloadavg())
    if args.floor_only:
        return
    for n, m in shapes:
        for dtype in (np.float32, np.float64):
            bench_shape(n, m, dtype, args.rounds, args.scipy_rounds)
    partial_fit_memory()


if __name__ == "__main__":
    main()
