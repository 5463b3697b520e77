"""Time and peak memory of streaming a Gram matrix: skid's GramAccumulator against the plain way.

The peer is the accumulation skid did before (reimplemented here): per batch NumPy's full
``blockᵀ @ block`` (which itself runs ``?syrk`` and then fills the lower triangle element by
element), cast to a new float64 m × m array and added, and a factorization that first makes a
scaled m × m copy (and LAPACK's wrapper a Fortran-ordered one of that). skid stores only the
upper triangle, in column panels 256 wide (about m (m + 256) / 2 entries), adds each panel's
product ``block[:, :stop]ᵀ block[:, start:stop]`` into its panel in place (no m × m temporary),
and factorizes one C-ordered copy of the triangle in place (``factorize(consume=True)``
releases each panel as it is copied). Time: median of rounds; memory: tracemalloc's peak over
what was allocated before (NumPy's buffers are traced), measured in separate runs, and for the
factorization also the resident set's peak above its start (Linux; tracemalloc counts an array
when it is allocated, the resident set when its pages are touched, and no longer once it is
released, which is what ``consume=True`` does panel by panel). A third
table does the same with torch tensors (what calibration hands the accumulator): torch's full
product cast to float64 and added, against skid's panels on torch's threads.

    python benchmarks/bench_gram.py            # 4096×2048 float32 in batches of 256 rows
    python benchmarks/bench_gram.py --quick    # 1024×512
    python benchmarks/bench_gram.py --torch-products   # torch's steps or NumPy's BLAS
    python benchmarks/bench_gram.py --dpstrf-forms     # LAPACK's upper or lower form
    python benchmarks/bench_gram.py --left-rows --threads 2   # torch's steps: left rows
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import math
import os
import statistics
import time
import tracemalloc

import numpy as np
from _models import peak_above_start, print_table, set_threads
from scipy.linalg import lapack

from skid import _linalg


class PlainGram:
    """The plain accumulation (skid's before ?syrk): full products, float64 copies."""

    def __init__(self, precision):
        self.precision, self.gram, self.n_samples = precision, None, 0

    def update(self, X):
        dtype = "float64" if self.precision == "float64" else "float32"
        part = None
        max_elements = (_linalg.BLOCK_ELEMENTS if dtype == "float64"
                        else _linalg.NATIVE_BLOCK_ROWS * X.shape[1])
        for rows in _linalg.row_blocks(X.shape[0], X.shape[1], max_elements):
            block = X[rows].astype(dtype, copy=False)
            product = (block.T @ block).astype(np.float64)
            part = product if part is None else part + product
        if not math.isfinite(float(part.diagonal().max())):  # the check before adding
            raise ValueError("non-finite")
        if self.gram is None:
            self.gram = part
        else:
            self.gram += part
        self.n_samples += X.shape[0]
        return self

    def factorize(self):
        gram = self.gram
        if not np.isfinite(gram).all():
            raise ValueError("non-finite")
        diag_max = float(gram.diagonal().max())
        shift = _linalg.binary_exponent(diag_max) // 2 * 2
        scaled = np.ldexp(gram, -shift) if shift else gram
        cutoff = -1.0 if self.precision == "float64" else (  # skid's trust cutoff
            gram.shape[0] * float(np.finfo(np.float32).eps) * math.ldexp(diag_max, -shift))
        factor, piv, rank, _ = lapack.dpstrf(scaled, lower=0, tol=cutoff,
                                             overwrite_a=scaled is not gram)
        U = factor[:rank]
        for i in range(1, rank):
            U[i, :i] = 0.0
        return piv, U


def data(n, m, seed=0):
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((n, m // 4), dtype=np.float32)
    X = latent @ rng.standard_normal((m // 4, m), dtype=np.float32)
    return X + np.float32(0.05) * rng.standard_normal((n, m), dtype=np.float32)


def accumulate(make, X, batch):
    acc = make()
    for start in range(0, X.shape[0], batch):
        acc.update(X[start : start + batch])
    return acc


def timed(fn, rounds, setup=None):
    times = []
    for _ in range(rounds):
        if setup is not None:
            setup()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def traced_peak(fn, setup=None) -> float:
    """Peak MiB that ``fn`` allocates above what was allocated when it started."""
    if setup is not None:
        setup()
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def bench(n, m, batch, rounds):
    X = data(n, m)
    gram_mib = 8 * m * m / 2**20
    rows = []
    for precision in ("native", "float64"):
        ways = {"plain blockᵀ @ block, float64 copies": lambda p=precision: PlainGram(p),
                "skid triangle panels, in place": lambda p=precision: _linalg.GramAccumulator(p)}
        results = {name: (timed(lambda mk=make: accumulate(mk, X, batch), rounds),
                          traced_peak(lambda mk=make: accumulate(mk, X, batch)))
                   for name, make in ways.items()}
        plain_s, plain_mib = results["plain blockᵀ @ block, float64 copies"]
        for name, (seconds, mib) in results.items():
            rows.append((precision, name, seconds * 1e3, plain_s / seconds, mib,
                         mib / gram_mib))
    print_table(
        f"accumulating {n}×{m} float32 in batches of {batch} rows (the float64 Gram: "
        f"{gram_mib:.0f} MiB; median of {rounds} rounds)",
        ["precision", "way", "time ms", "× faster", "peak MiB", "peak ÷ Gram"],
        rows, ["s", "s", ".1f", ".2f", ".1f", ".2f"],
    )

    plain = accumulate(lambda: PlainGram("native"), X, batch)
    ours = accumulate(lambda: _linalg.GramAccumulator("native"), X, batch)
    kept = (ours.triangle(), ours.n_features, ours.scale_exp, ours.n_samples,
            ours.float32_products)

    def refill():  # consume=True hands the statistic over: a fresh copy before each run
        ours.set_triangle(*kept[:3])
        ours.n_samples, ours.float32_products = kept[3:]

    ways = {"plain (scaled m × m copy)": (plain.factorize, None, plain.gram.nbytes),
            "skid factorize()": (ours.factorize, None, ours.nbytes),
            "skid factorize(consume=True)": (lambda: ours.factorize(consume=True), refill,
                                             ours.nbytes)}
    resident = os.access("/proc/self/clear_refs", os.W_OK)
    rows = []
    for name, (fn, setup, held) in ways.items():
        mib, held = traced_peak(fn, setup), held / 2**20
        if setup is not None:
            setup()
        rss = peak_above_start(fn) if resident else math.nan
        rows.append((name, timed(fn, rounds, setup) * 1e3, held, mib, rss,
                     (held + rss) / gram_mib))
    print_table(
        f"pivoted Cholesky of that {m}×{m} Gram (float32 products; a consumed statistic is "
        "refilled before each run, outside the clock and the trace): the statistic held, "
        "then the peak above it, traced (allocations) and resident (touched pages; "
        "released ones count off)",
        ["way", "time ms", "statistic MiB", "traced peak MiB", "resident peak MiB",
         "(statistic + resident) ÷ Gram"], rows, ["s", ".1f", ".1f", ".1f", ".1f", ".2f"],
    )


def bench_torch(n, m, batch, rounds):
    import torch

    X = torch.as_tensor(data(n, m))
    batches = [X[start : start + batch] for start in range(0, n, batch)]

    def plain():
        gram = None
        for block in batches:
            part = (block.T @ block).double()
            gram = part if gram is None else gram.add_(part)

    def ours():
        acc = _linalg.GramAccumulator("native")
        for block in batches:
            acc.update(block)

    times = {"torch blockᵀ @ block, float64 copies": timed(plain, rounds),
             "skid triangle panels": timed(ours, rounds)}
    base = times["torch blockᵀ @ block, float64 copies"]
    print_table(
        f"accumulating {n}×{m} float32 torch tensors in batches of {batch} rows, "
        f"{torch.get_num_threads()} torch thread(s) (median of {rounds} rounds)",
        ["way", "time ms", "× faster"],
        [(name, t * 1e3, base / t) for name, t in times.items()], ["s", ".1f", ".2f"],
    )


def alternated_medians(ways: dict, rounds: int, before_each=None) -> dict:
    """Median wall time of each way, the ways run one after the other each round (each after
    ``before_each()``, untimed, if given)."""
    times = {name: [] for name in ways}
    for _ in range(rounds):
        for name, fn in ways.items():
            if before_each is not None:
                before_each()
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def bench_torch_products(rounds):
    """One torch block's panel products on one thread: torch's steps (what several threads
    use) against NumPy's BLAS (what one thread uses), alternated, with NumPy's ``XᵀX`` of
    the same block (the floor) measured beside them."""
    import torch

    torch.set_num_threads(1)
    rows = [_torch_products_row(n, m, rounds)
            for n, m in ((1460, 96), (2048, 256), (1460, 384), (1460, 1024), (1460, 1536))]
    print_table(
        "one float32 torch block's panel products, one thread (median of "
        f"{rounds} alternated rounds): torch's steps against NumPy's BLAS, and NumPy's "
        "XᵀX of the block (the floor)",
        ["block", "torch steps ms", "NumPy BLAS ms", "NumPy ÷ steps", "NumPy ÷ floor"],
        rows, ["s", ".2f", ".2f", ".2f", ".2f"])


def _torch_products_row(n, m, rounds) -> tuple:
    import torch

    from skid._linalg import _blocking, _gram

    block = torch.as_tensor(data(n, m))
    view = block.numpy()
    buffers = {}

    def products(way):
        original = _gram._product_step
        if way == "steps":
            _gram._product_step = lambda b: _blocking.product_step(m)
        try:
            buffers[way] = _gram._whole_product(block, buffers.get(way))[0]
        finally:
            _gram._product_step = original

    square = np.empty((m, m), np.float32)
    med = alternated_medians({"steps": lambda: products("steps"),
                              "numpy": lambda: products("numpy"),
                              "floor": lambda: np.matmul(view.T, view, out=square)}, rounds)
    return (f"{n}×{m}", med["steps"] * 1e3, med["numpy"] * 1e3,
            med["numpy"] / med["steps"], med["numpy"] / med["floor"])


def _all_steps(block, buffer, m):
    """The panel products as the accumulator made them before: every step of rows up to its
    own last column from the first column, the rows left of each square included."""
    import torch

    from skid._linalg import _blocking, _gram

    step, offset = _blocking.product_step(m), 0
    for start, stop in _gram._panel_bounds(m):
        part = buffer[offset : offset + (stop - start) * stop].view(stop - start, stop)
        for low in range(start, stop, step):
            high = min(low + step, stop)
            torch.mm(block[:, low:high].T, block[:, :high],
                     out=part[low - start : high - start, :high])
        offset += (stop - start) * stop


def bench_left_rows(rounds):
    """One torch block's panel products in torch's steps (what several threads use): the rows
    left of each panel's square in one product (now) against in the square's steps (before),
    alternated, with torch's whole ``XᵀX`` of the block beside them; every product follows a
    torch product of the block (torch's threads just ran, as in a calibration pass), and
    whether the two ways gave the same entries (MKL's GEMM does: each entry's sum is
    computed alike, however the rows are split)."""
    import torch

    rows = [_left_rows_row(n, m, rounds)
            for n, m in ((1553, 384), (1553, 768), (1553, 1024), (1553, 1536), (4096, 1536))]
    print_table(
        "torch's steps with each panel's left rows in one product or in steps, a float32 "
        f"block, {torch.get_num_threads()} torch thread(s) (median of {rounds} alternated "
        "rounds): the rows left of each square in one product (now) or in the square's "
        "steps (before), and torch's whole XᵀX",
        ["block", "before ms", "now ms", "now ÷ before", "now ÷ XᵀX", "same entries"],
        rows, ["s", ".2f", ".2f", ".2f", ".2f", "s"])


def _left_rows_row(n, m, rounds) -> tuple:
    import torch

    from skid._linalg import _blocking, _gram

    block = torch.as_tensor(data(n, m))
    weight = torch.as_tensor(data(m, 384))
    size = _gram._whole_entries(m, "torch")
    before, now = torch.zeros(size), torch.zeros(size)
    original = _gram._product_step
    _gram._product_step = lambda b: _blocking.product_step(m)
    try:
        med = alternated_medians({"before": lambda: _all_steps(block, before, m),
                                  "now": lambda: _gram._whole_product(block, now),
                                  "floor": lambda: block.T @ block},
                                 rounds, before_each=lambda: block @ weight)
    finally:
        _gram._product_step = original
    return (f"{n}×{m}", med["before"] * 1e3, med["now"] * 1e3, med["now"] / med["before"],
            med["now"] / med["floor"], "yes" if torch.equal(before, now) else "no (rounding)")


def bench_dpstrf_forms(rounds):
    """LAPACK's pivoted Cholesky given a Fortran-ordered upper triangle (the form skid
    passed before) against the lower one (a C-ordered upper triangle's transpose: what
    ``factorize_gram`` passes now), alternated, one BLAS thread."""
    rows = []
    for m in (256, 768, 1536):
        X = data(2 * m, m).astype(np.float64)
        gram = np.asfortranarray(X.T @ X)
        ways = {"upper": lambda g=gram: lapack.dpstrf(g.copy(order="F"), lower=0,
                                                      overwrite_a=1),
                "lower": lambda g=gram: lapack.dpstrf(g.copy(order="F"), lower=1,
                                                      overwrite_a=1)}
        med = alternated_medians(ways, rounds)
        rows.append((m, med["upper"] * 1e3, med["lower"] * 1e3, med["lower"] / med["upper"]))
    print_table(f"dpstrf of an m × m Gram, one thread (median of {rounds} alternated rounds, "
                "copy included)", ["m", "upper ms", "lower ms", "lower ÷ upper"], rows,
                ["d", ".1f", ".1f", ".2f"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1024×512 only")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (median)")
    parser.add_argument("--batch", type=int, default=256, help="rows per update")
    parser.add_argument("--threads", type=int, default=1,
                        help="BLAS threads; 0: the libraries' defaults")
    parser.add_argument("--torch-products", action="store_true",
                        help="only the table of torch's panel products on one thread")
    parser.add_argument("--dpstrf-forms", action="store_true",
                        help="only the table of LAPACK's two triangle forms")
    parser.add_argument("--left-rows", action="store_true",
                        help="only the table of torch's steps with each panel's left rows in "
                             "one product or in steps (on --threads torch threads)")
    args = parser.parse_args()
    set_threads(args.threads)
    if args.torch_products or args.dpstrf_forms or args.left_rows:
        if args.left_rows:
            bench_left_rows(5 if args.quick else 15)
        if args.torch_products:
            bench_torch_products(7 if args.quick else 15)
        if args.dpstrf_forms:
            bench_dpstrf_forms(3 if args.quick else 9)
        return
    with contextlib.suppress(OSError, AttributeError):  # glibc: freed arrays go back to the OS,
        ctypes.CDLL(None).mallopt(-3, 1 << 17)  # M_MMAP_THRESHOLD: the resident set follows
    n, m = (1024, 512) if args.quick else (4096, 2048)
    bench(n, m, args.batch, 3 if args.quick else args.rounds)
    bench_torch(n, m, args.batch, 3 if args.quick else args.rounds)


if __name__ == "__main__":
    main()
