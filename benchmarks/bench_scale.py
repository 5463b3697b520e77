"""Scale-out: block-wise calibration, data-parallel statistics traffic, the ID on Dask.

Three tables, every peer measured in the same run:

1. Peak memory and time of ``NetworkCompressor.fit`` against the number of blocks of a
   residual MLP stack (LayerNorm → Linear(W, H) → GELU → Linear(H, W), H-wide units, one per
   block): one pass (``blocks=None``) against block-wise (``blocks="layers"``), for
   ``calibration="original"`` and ``"sequential"`` (``rank=0.5``) and for ``target_flops=0.5``.
   Peak resident memory above the start of the call, one fresh subprocess per cell (torch's
   CPU allocations are invisible to tracemalloc), also less the fit's working copy of the
   model; time as a median of rounds, and ÷ one plain forward pass over the same data.
   The stack stands in for a model whose blocks each hold more statistics than
   ``skid.nn._blockwise.SHARED_PASS_BYTES`` (an LLM's): its small blocks would otherwise share
   passes, all eight in one, so the budget is set to 0 here and each block has a pass.
2. Statistics traffic per rank of data-parallel calibration (2 Gloo ranks on localhost, each
   on half the data): bytes all-reduced/gathered per rank against the calibration size, and
   the prediction Σ 4·m(m+1) (the upper triangle of one float64 Gram per unit) + the counts;
   the 2-rank fit's time next to one process on all the data.
3. ``InterpolativeDecomposition.fit`` on a Dask array larger than the memory limit of every
   worker of a ``LocalCluster`` (chunks generated on the workers, never gathered), against
   Dask's own ``(X.T @ X).compute()`` on the same cluster (the floor of any exact ID).

    python benchmarks/bench_scale.py            # full run (about 4 minutes, 1 thread)
    python benchmarks/bench_scale.py --quick    # smoke run (about 40 s)
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from _models import (
    forward_pass,
    median_time,
    peak_above_start,
    peak_ratio,
    print_table,
    set_threads,
)
from torch import nn

from skid import InterpolativeDecomposition, NetworkCompressor, _linalg

BATCH_SIZE = 256
RANK = 0.5


class Block(nn.Module):
    def __init__(self, width, hidden):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up, self.act = nn.Linear(width, hidden), nn.GELU()
        self.down = nn.Linear(hidden, width)

    def forward(self, x):
        return x + self.down(self.act(self.up(self.norm(x))))


class Stack(nn.Module):
    def __init__(self, n_blocks, width, hidden):
        super().__init__()
        self.layers = nn.ModuleList(Block(width, hidden) for _ in range(n_blocks))
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def make_stack(n_blocks, width, hidden, n_rows):
    torch.manual_seed(0)
    model = Stack(n_blocks, width, hidden).eval()
    X = torch.randn(n_rows, width, generator=torch.Generator().manual_seed(1))
    return model, X


# ----------------------------------------------------------------- 1. memory/time vs blocks

MODES = {  # name: (blocks, calibration, the width request, the one-pass row it is compared to)
    "one pass, original": (None, "original", {"rank": RANK}, "one pass, original"),
    "block-wise, original": ("layers", "original", {"rank": RANK}, "one pass, original"),
    "one pass, sequential": (None, "sequential", {"rank": RANK}, "one pass, original"),
    "block-wise, sequential": ("layers", "sequential", {"rank": RANK}, "one pass, original"),
    "one pass, target_flops": (None, "original", {"target_flops": 0.5},
                               "one pass, target_flops"),
    "block-wise, target_flops": ("layers", "original", {"target_flops": 0.5},
                                 "one pass, target_flops"),
}


def blocks_child(args):
    """Fresh process: peak memory and median time of one mode's fit (JSON on stdout)."""
    set_threads(args.threads)
    n_blocks, mode = args.blocks_child
    model, X = make_stack(int(n_blocks), args.width, args.hidden, args.rows)
    blocks, calibration, request, _ = MODES[mode]
    from skid.nn import _blockwise

    _blockwise.SHARED_PASS_BYTES = 0  # a block a pass, as an LLM's blocks (see the docstring)

    def fit():
        NetworkCompressor(model, blocks=blocks, calibration=calibration,
                          batch_size=BATCH_SIZE, **request).fit(X)

    NetworkCompressor(model, rank=RANK, blocks=blocks).fit(X[:8])  # imports, one-time caches
    peak = peak_above_start(fit)
    forward = median_time(lambda: forward_pass(model, X, BATCH_SIZE), args.rounds)
    seconds = median_time(fit, args.rounds)
    copy_mib = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**20
    print(json.dumps({"peak": peak, "time": seconds, "forward": forward, "copy": copy_mib}))


def bench_blocks(args, block_counts):
    if not os.access("/proc/self/clear_refs", os.W_OK):
        print("\npeak memory vs blocks: skipped (needs Linux's /proc/self/clear_refs)")
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}  # freed blocks go back to the OS
    rows = []
    # what one unit's statistic stores (the Gram's upper triangle), from the accumulator itself
    one = _linalg.GramAccumulator().update(torch.zeros(1, args.hidden))
    gram_mib = one.nbytes / 2**20
    for n_blocks in block_counts:
        done = {}
        for mode, (_, _, _, base) in MODES.items():
            command = [sys.executable, __file__, "--blocks-child", str(n_blocks), mode,
                       *_shared_flags(args)]
            out = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
            r = done[mode] = json.loads(out.stdout.strip().splitlines()[-1])
            b = done[base]
            grams = gram_mib * (n_blocks if mode.startswith("one pass") else 1)
            rows.append((n_blocks, mode, grams, r["peak"], peak_ratio(r["peak"], b["peak"]),
                         r["peak"] - r["copy"],
                         peak_ratio(r["peak"] - r["copy"], b["peak"] - b["copy"]),
                         r["time"], r["time"] / r["forward"], r["time"] / b["time"]))
    print_table(
        f"peak memory and time vs number of blocks: residual MLP stack, W={args.width}, "
        f"H={args.hidden} (one {args.hidden}-wide unit per block), {args.rows} rows, "
        f"rank={RANK} or target_flops=0.5; peak resident memory above the start of the fit "
        f"(MiB), one fresh process per row, and the same less the fit's working copy of the "
        f"model (its weights, the same in every mode: what is left is the calibration's own "
        f"memory); median time of {args.rounds} fits; ratios to the one-pass fit of the same "
        f"width request",
        ["blocks", "mode", "statistics held (MiB)", "fit peak MiB", "÷ one pass",
         "peak − model copy MiB", "÷ one pass", "fit s", "÷ forward pass", "time ÷ one pass"],
        rows, ["d", "s", ".1f", ".1f", ".2f", ".1f", ".2f", ".3f", ".1f", ".2f"],
    )


def _shared_flags(args):
    return ["--threads", str(args.threads), "--rounds", str(args.rounds),
            "--width", str(args.width), "--hidden", str(args.hidden), "--rows", str(args.rows)]


# ------------------------------------------------------------------------- 2. rank traffic


def _rank_main(rank, port, n_rows, args, out_path):
    import torch.distributed as dist

    from skid.nn import _distributed

    set_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    try:
        model, X = make_stack(args.traffic_blocks, args.width, args.hidden, n_rows)
        shard = X[: n_rows // 2] if rank == 0 else X[n_rows // 2 :]
        NetworkCompressor(model, rank=RANK).fit(shard[:8])  # warm-up (imports, connections)
        before, start = _distributed.reduced_bytes(), time.perf_counter()
        nc = NetworkCompressor(model, rank=RANK, batch_size=BATCH_SIZE).fit(shard)
        seconds = time.perf_counter() - start
        traffic = _distributed.reduced_bytes() - before
        widths = [row["width_before"] for row in nc.layers_]
        with open(f"{out_path}.{rank}", "w") as f:
            json.dump({"bytes": traffic, "time": seconds, "widths": widths}, f)
        dist.barrier()  # both ranks done before either tears Gloo down (a teardown race aborts)
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def bench_traffic(args, sizes):
    import torch.multiprocessing as mp

    rows = []
    for n_rows in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "rank")
            mp.start_processes(_rank_main, args=(free_port(), n_rows, args, path), nprocs=2,
                               start_method="spawn")
            ranks = []
            for r in range(2):
                with open(f"{path}.{r}") as f:
                    ranks.append(json.load(f))
        model, X = make_stack(args.traffic_blocks, args.width, args.hidden, n_rows)
        NetworkCompressor(model, rank=RANK).fit(X[:8])  # warm-up, as in the ranks
        single = median_time(
            lambda m=model, x=X: NetworkCompressor(m, rank=RANK, batch_size=BATCH_SIZE).fit(x),
            args.rounds)
        widths = ranks[0]["widths"]
        predicted = sum(8 * (m * (m + 1) // 2) for m in widths)  # float64 triangles
        two = max(r["time"] for r in ranks)
        rows.append((n_rows, len(widths), ranks[0]["bytes"], ranks[1]["bytes"], predicted,
                     ranks[0]["bytes"] / predicted, two, single, two / single))
    print_table(
        f"statistics traffic per rank: 2 Gloo ranks on localhost, each on half the rows; "
        f"stack of {args.traffic_blocks} blocks, H={args.hidden} (block-wise: one statistics "
        "pass per block, each adding 16 B of counts); bytes all-reduced per rank against "
        "Σ 4·m(m+1) (the upper triangle of one float64 Gram per unit)",
        ["rows (all ranks)", "units", "rank 0 bytes", "rank 1 bytes", "Σ 4·m(m+1)",
         "÷ Σ 4·m(m+1)", "2-rank fit s", "1-process fit s", "2 ranks ÷ 1"],
        rows, ["d", "d", "d", "d", "d", ".3f", ".3f", ".3f", ".2f"],
    )


# ------------------------------------------------------------------------------- 3. Dask ID


def bench_dask(args):
    import dask.array as da
    from distributed import Client, LocalCluster

    n, m = args.dask_rows, args.dask_cols
    chunk = max(1, (32 << 20) // (8 * m))  # 32 MiB row chunks
    limit = args.dask_worker_mib
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                     memory_limit=f"{limit}MiB", dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        X = da.random.default_rng(0).standard_normal((n, m), chunks=(chunk, m))
        X = X + X[:, :8].sum(axis=1, keepdims=True)  # some shared structure
        fit_times, floor_times = [], []
        for _ in range(args.rounds):
            start = time.perf_counter()
            est = InterpolativeDecomposition(rank=m // 4, method="gram").fit(X)
            fit_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            (X.T @ X).compute()
            floor_times.append(time.perf_counter() - start)
        workers = client.run(lambda dask_worker: dask_worker.memory_manager.memory_limit)
    fit, floor = statistics.median(fit_times), statistics.median(floor_times)
    size = n * m * 8 / 2**20
    print_table(
        f"InterpolativeDecomposition.fit on a Dask array, LocalCluster of 2 worker processes "
        f"(1 thread each, memory limit {limit} MiB each), rank={m // 4}, method='gram', "
        f"row chunks of {chunk}; median of {args.rounds}",
        ["shape", "X MiB", "X ÷ worker limit", "fit s", "(X.T @ X).compute() s",
         "fit ÷ XᵀX", "error_"],
        [(f"{n}×{m}", size, size / (min(workers.values()) / 2**20), fit, floor, fit / floor,
          est.error_)],
        ["s", ".0f", ".1f", ".2f", ".2f", ".2f", ".4f"],
    )


# ------------------------------------------------------------------------------------ main


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run")
    parser.add_argument("--threads", type=int, default=1, help="torch and BLAS threads (0: keep)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--rows", type=int, default=2048, help="calibration rows (table 1)")
    parser.add_argument("--traffic-blocks", type=int, default=4)
    parser.add_argument("--dask-rows", type=int, default=4_000_000)
    parser.add_argument("--dask-cols", type=int, default=64)
    # a worker process re-imports this script (spawn), torch included: ~350 MiB before any data
    parser.add_argument("--dask-worker-mib", type=int, default=1024)
    parser.add_argument("--tables", default="blocks,traffic,dask",
                        help="comma-separated subset of blocks,traffic,dask")
    parser.add_argument("--blocks-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.blocks_child:
        return blocks_child(args)
    block_counts, traffic_sizes = [2, 4, 8], [1024, 8192]
    if args.quick:
        args.rounds, args.width, args.hidden, args.rows = 1, 32, 96, 256
        args.dask_rows, args.dask_cols = 200_000, 64
        block_counts, traffic_sizes = [2, 4], [256, 1024]
    set_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    tables = args.tables.split(",")
    if "blocks" in tables:
        bench_blocks(args, block_counts)
    if "traffic" in tables:
        bench_traffic(args, traffic_sizes)
    if "dask" in tables:
        bench_dask(args)


if __name__ == "__main__":
    main()
