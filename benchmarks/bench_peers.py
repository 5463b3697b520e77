"""skid beside the structured-pruning methods users compare it with, no fine-tuning.

Re-implemented here (not part of skid), on the same calibration data, at the same widths, and
applied through skid's own surgery (the consumer drops the channels it no longer gets):

- **magnitude**: a channel's group L2 norm (producer rows and consumer column; Torch-Pruning's
  group importance);
- **Wanda-sp** (An et al. 2024's structured Wanda): ``Σ_o |W_oj| · ‖X_j‖₂`` of the consumer's
  weights and its input channel's norm;
- **FLAP** (An et al., AAAI 2024): the fluctuation ``Var(X_j) · ‖W_:j‖²``, kept per layer
  (*uniform*) or by the standardized score over all layers (*global*: per-layer widths vary),
  with its **bias compensation**: the removed channels' means enter the consumer's bias
  (``b ← b + W_:,removed μ_removed``, the :func:`skid.nn._surgery.fold_constant` verb with
  ``T`` = the identity rows of the kept channels).

skid beside them: the ID at the same uniform width (``rank``), with ``fit_intercept=True``, and
``target_flops`` set to the FLOPs the uniform cut keeps (heads and channels, the default).

Models: the LLaMA-shaped causal LM of ``benchmarks/_llm.py`` (trained here on CPython's
``Lib/*.py``; held-out perplexity, lower is better; its two SwiGLU MLPs pruned) and the digits
CNN of ``tests/nn/digits.py`` (top-1 agreement with the original on the held-out digits, and
accuracy). Then the LLaMA's heads at one and two query heads per key/value group: skid's head
choice (candidates judged on the held-out first calibration batch, ``skid/nn/_head_judge.py``)
beside the candidates it chooses among (``skid/nn/_head_greedy.py``) and the choice by the
smallest exact error it replaced, and what the judging costs.

    python benchmarks/bench_peers.py            # the tables of benchmarks/README.md
    python benchmarks/bench_peers.py --quick    # smoke run (20 training steps)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import time
from unittest import mock

import numpy as np
import torch
from _models import print_table, set_threads, train_digits_cnn

from skid import NetworkCompressor
from skid.nn._flops import count_flops
from skid.nn._plan import Selection
from skid.nn._surgery import apply_selection, as_samples

FRACTIONS = (0.8, 0.65, 0.5, 0.35)
CNN_FRACTIONS = FRACTIONS + (0.25,)
PEERS = ("magnitude", "Wanda-sp", "FLAP (uniform)", "FLAP (global)")


# ---------------------------------------------------------------------------------- peers


def consumer_statistics(model, units, call) -> list[dict]:
    """Per unit: rows, column sums and sums of squares of its first consumer's input."""
    stats = [{"n": 0, "sum": 0.0, "sq": 0.0} for _ in units]
    handles = []
    for unit, s in zip(units, stats, strict=True):
        consumer = unit.consumers[0]

        def hook(module, args, s=s, positions=consumer.positions):
            Z = as_samples(module, args[0], positions).detach().double()
            s["n"] += Z.shape[0]
            s["sum"] = s["sum"] + Z.sum(0)
            s["sq"] = s["sq"] + (Z * Z).sum(0)

        handles.append(model.get_submodule(consumer.name).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            call(model)
    finally:
        for h in handles:
            h.remove()
    for s in stats:
        s["mean"] = (s["sum"] / s["n"]).numpy()
        s["var"] = (s["sq"] / s["n"]).numpy() - s["mean"] ** 2
        s["norm"] = np.sqrt((s["sq"]).numpy())
    return stats


def consumer_weight(model, unit) -> np.ndarray:
    """The first consumer's weight as (out, channels, rest)."""
    consumer = unit.consumers[0]
    w = model.get_submodule(consumer.name).weight.detach().double()
    m = unit.width
    if w.ndim == 2:  # Linear, maybe after a channel-major flatten
        return w.reshape(w.shape[0], m, -1).numpy()
    return w.reshape(w.shape[0], m, -1).numpy()  # Conv: (out, in, taps)


def scores(model, unit, stats, method) -> np.ndarray:
    """A channel importance of ``method`` (higher: keep)."""
    W = consumer_weight(model, unit)
    if method == "magnitude":
        score = sum(model.get_submodule(p).weight.detach().double().pow(2).flatten(1).sum(1)
                    .numpy() for p in unit.producers)
        return score + (W**2).sum((0, 2))
    if method == "Wanda-sp":
        return np.abs(W).sum((0, 2)) * stats["norm"]
    return stats["var"] * (W**2).sum((0, 2))  # FLAP's fluctuation


def peer_keeps(model, units, stats, method, widths) -> list[np.ndarray]:
    """Kept channels per unit: the top ``widths[i]`` per unit, or (FLAP global) the top
    ``Σ widths`` of the per-unit standardized scores (at least one per unit)."""
    base = "FLAP" if method.startswith("FLAP") else method
    per_unit = [scores(model, u, s, base) for u, s in zip(units, stats, strict=True)]
    if method != "FLAP (global)":
        return [np.sort(np.argsort(-sc, kind="stable")[:k])
                for sc, k in zip(per_unit, widths, strict=True)]
    standard = [(sc - sc.mean()) / (sc.std() + 1e-30) for sc in per_unit]
    owner = np.concatenate([np.full(len(sc), i) for i, sc in enumerate(standard)])
    order = np.argsort(-np.concatenate(standard), kind="stable")[:int(sum(widths))]
    offsets = np.cumsum([0] + [len(sc) for sc in standard])
    keeps = []
    for i, sc in enumerate(standard):
        mine = order[owner[order] == i] - offsets[i]
        keeps.append(np.sort(mine) if mine.size else np.array([int(np.argmax(sc))]))
    return keeps


def pruned(model, units, keeps, stats=None) -> torch.nn.Module:
    """A copy keeping ``keeps``; with ``stats``, the removed channels' means go into the
    consumer's bias (FLAP's compensation)."""
    model = copy.deepcopy(model)
    for unit, keep, s in zip(units, keeps, stats or [None] * len(units), strict=True):
        keep = torch.as_tensor(np.sort(keep), dtype=torch.int64)
        T = torch.eye(unit.width, dtype=torch.float64)[keep]
        intercepts = None
        if s is not None:
            b = torch.as_tensor(s["mean"]).clone()
            b[keep] = 0.0
            intercepts = (b,) * len(unit.consumers)
        apply_selection(model, Selection(unit, keep, T, float("nan"), intercepts=intercepts))
    return model.eval()


def peer_models(model, units, stats, widths) -> dict:
    return {method: pruned(model, units, peer_keeps(model, units, stats, method, widths),
                           stats if method.startswith("FLAP") else None)
            for method in PEERS}


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def flops(model, args, kwargs=None) -> int:
    """FLOPs of one sample's forward pass (skid's counter)."""
    return count_flops(model, args, kwargs)[0]


# ------------------------------------------------------------------------------------ LLaMA


def llama_rows(steps, n_calib, n_test, fractions, cache) -> tuple[list, float]:
    from _llm import INNER, perplexity, trained, windows

    model, train, held_out = trained(steps, cache)
    calib = {"input_ids": windows(train, n_calib, seed=1)[:, :-1]}
    test = windows(held_out, n_test, seed=2)
    base = perplexity(model, test)
    total = n_params(model)
    example = ((), {"input_ids": calib["input_ids"][:1]})
    full = flops(model, *example)
    rows = [("original", "-", 1.0, 1.0, base)]
    for fraction in fractions:
        started = time.perf_counter()
        rank = NetworkCompressor(model, rank=fraction, prune="channels", batch_size=32).fit(calib)
        rank_time = time.perf_counter() - started
        units = [s.unit for s in rank.plan_.selections]
        widths = [int(s.keep.numel()) for s in rank.plan_.selections]
        stats = consumer_statistics(model, units, lambda m: [m(**{"input_ids": b}) for b in
                                                             calib["input_ids"].split(32)])
        kept = rank.flops_["after"] / rank.flops_["before"]
        fits = {"skid ID (rank)": rank,
                "skid ID + fit_intercept": NetworkCompressor(
                    model, rank=fraction, prune="channels", fit_intercept=True,
                    batch_size=32).fit(calib)}
        started = time.perf_counter()
        fits["skid target_flops"] = NetworkCompressor(
            model, target_flops=kept, batch_size=32).fit(calib)
        tf_time = time.perf_counter() - started
        fits["skid target_flops + fit_intercept"] = NetworkCompressor(
            model, target_flops=kept, batch_size=32, fit_intercept=True).fit(calib)
        label = f"MLP {widths[0]}/{INNER}"
        for name, candidate in peer_models(model, units, stats, widths).items():
            rows.append((name, label, n_params(candidate) / total,
                         flops(candidate, *example) / full, perplexity(candidate, test)))
        for name, nc in fits.items():
            small = nc.compressed_model_
            detail = "-".join(str(r["width_after"]) for r in nc.layers_)
            rows.append((f"{name} [{detail}]", label, n_params(small) / total,
                         flops(small, *example) / full, perplexity(small, test)))
        print(f"  (target_flops={kept:.3f}: fit in {tf_time:.2f} s, {tf_time / rank_time:.1f}× "
              f"the rank fit's {rank_time:.2f} s)", flush=True)
    return rows, base


def heads_rows(steps, n_calib, n_test, cache, seed=1) -> list:
    """One and two query heads per key/value group: the candidates skid chooses among (the
    same Gram and fold; only the candidates, and how one is chosen, differ); ``seed`` draws
    the calibration windows."""
    from _llm import HEADS, KV_HEADS, perplexity, trained, windows

    model, train, held_out = trained(steps, cache)
    calib = {"input_ids": windows(train, n_calib, seed=seed)[:, :-1]}
    test = windows(held_out, n_test, seed=2)
    rows = []
    per_group = HEADS // KV_HEADS
    no_judge = ("skid.nn._heads.judged_on_held_out", lambda *a, **k: {})
    variants = (  # (label, patches)
        ("rounds only", [("skid.nn._heads.groupwise_builders", lambda *a, **k: {}), no_judge]),
        ("smallest exact error (before)", [no_judge]),
        ("skid: judged on held-out rows", []),
        ("per-group greedy alone", [("skid.nn._heads.groupwise_builders", _forced_groupwise),
                                    no_judge]),
    )
    for count in (1, 2):
        rank = count / per_group
        for label, patches in variants:
            with contextlib.ExitStack() as stack:
                for target, replacement in patches:
                    stack.enter_context(mock.patch(target, replacement))
                for calibration in ("original", "corrective"):
                    nc = NetworkCompressor(model, rank=rank, prune="heads", batch_size=32,
                                           calibration=calibration).fit(calib)
                    error = np.sqrt(np.mean([r["error"] ** 2 for r in nc.layers_]))
                    forced = label == "per-group greedy alone"
                    rows.append((f"{count} per group", label, calibration,
                                 "-" if forced else f"{error:.4f}",
                                 perplexity(nc.compressed_model_, test)))
    return rows


def heads_cost(steps, n_calib, cache, rounds) -> list:
    """Process CPU time of ``fit`` (heads at one per group, ``"original"``) with the held-out
    judge and without it (no batch gathered apart: the code path before it), interleaved."""
    from _llm import HEADS, KV_HEADS, trained, windows

    model, train, _ = trained(steps, cache)
    calib = {"input_ids": windows(train, n_calib, seed=1)[:, :-1]}
    times = {"judged on held-out rows": [], "without the judge": []}
    for _ in range(rounds):
        for label in times:
            with contextlib.ExitStack() as stack:
                if label == "without the judge":
                    stack.enter_context(mock.patch("skid.nn._unit_kinds._Heads.holds_out",
                                                   lambda *a, **k: False))
                started = time.process_time()
                NetworkCompressor(model, rank=KV_HEADS / HEADS, prune="heads",
                                  batch_size=32).fit(calib)
                times[label].append(time.process_time() - started)
    base = float(np.median(times["without the judge"]))
    return [(label, float(np.median(t)), float(np.median(t)) / base)
            for label, t in times.items()]


def _forced_groupwise(*args, **kwargs):
    """The per-group greedy (own columns) made to win at its counts (its errors read 0)."""
    from skid.nn._head_greedy import groupwise_builders

    def forced(build, gram):
        fac = build(gram)
        fac.errors = np.where(np.isfinite(fac.errors), 0.0, fac.errors)
        return fac

    return {name: functools.partial(forced, build)
            for name, build in groupwise_builders(*args, **kwargs).items()}


# ------------------------------------------------------------------------------ digits CNN


def cnn_rows(fractions) -> list:
    model, data = train_digits_cnn()
    with torch.no_grad():
        reference = model(data.X_test).argmax(1)

    def score(candidate):
        with torch.no_grad():
            predicted = candidate(data.X_test).argmax(1)
        return (100 * float((predicted == reference).float().mean()),
                100 * float((predicted == data.y_test).float().mean()))

    total = n_params(model)
    example = (data.X_test[:1],)
    full = flops(model, example)
    rows = [("original", 1.0, 1.0, *score(model))]
    for fraction in fractions:
        rank = NetworkCompressor(model, rank=fraction).fit(data.X_calib)
        units = [s.unit for s in rank.plan_.selections]
        widths = [int(s.keep.numel()) for s in rank.plan_.selections]
        stats = consumer_statistics(model, units, lambda m: m(data.X_calib))
        kept = rank.flops_["after"] / rank.flops_["before"]
        for name, candidate in peer_models(model, units, stats, widths).items():
            rows.append((f"{name} @ rank {fraction}", n_params(candidate) / total,
                         flops(candidate, example) / full, *score(candidate)))
        fits = {
            "skid ID (rank)": rank,
            "skid ID + fit_intercept": NetworkCompressor(model, rank=fraction,
                                                         fit_intercept=True).fit(data.X_calib),
            "skid target_flops": NetworkCompressor(model, target_flops=kept).fit(data.X_calib),
            "skid target_flops + fit_intercept": NetworkCompressor(
                model, target_flops=kept, fit_intercept=True).fit(data.X_calib),
        }
        for name, nc in fits.items():
            detail = "-".join(str(r["width_after"]) for r in nc.layers_)
            rows.append((f"{name} @ rank {fraction} [{detail}]",
                         n_params(nc.compressed_model_) / total,
                         flops(nc.compressed_model_, example) / full,
                         *score(nc.compressed_model_)))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: default)")
    parser.add_argument("--skip", nargs="*", default=(), choices=("cnn", "llama", "heads"))
    parser.add_argument("--rounds", type=int, default=7, help="timing rounds (heads cost)")
    parser.add_argument("--heads-seeds", type=int, nargs="+", default=[1],
                        help="calibration draws of the heads table (1: the README's)")
    parser.add_argument("--cache", default=None,
                        help="file for the trained LLaMA's weights (read if it exists)")
    args = parser.parse_args()
    set_threads(args.threads)
    steps, n_calib, n_test = (20, 32, 32) if args.quick else (800, 64, 512)
    fractions = (0.5,) if args.quick else FRACTIONS
    if "cnn" not in args.skip:
        cnn_fractions = fractions if args.quick else CNN_FRACTIONS
        print_table(
            "digits CNN: top-1 agreement / accuracy on the held-out digits (%), no "
            "fine-tuning; peers at the widths of skid's rank cut",
            ["method", "params kept", "FLOPs kept", "agreement", "accuracy"],
            cnn_rows(cnn_fractions), ["s", ".3f", ".3f", ".1f", ".1f"])
    if "llama" not in args.skip:
        rows, base = llama_rows(steps, n_calib, n_test, fractions, args.cache)
        print_table(
            f"LLaMA-shaped causal LM ({steps} steps; {n_calib}×64 calibration tokens): "
            f"held-out perplexity on {n_test}×64 tokens (original {base:.3f}), both MLPs "
            "pruned at equal widths (FLAP global: equal total), no fine-tuning",
            ["method [widths per unit]", "MLP width", "params kept", "FLOPs kept",
             "perplexity"], rows, ["s", "s", ".3f", ".3f", ".3f"])
    if "heads" not in args.skip:
        for seed in args.heads_seeds:
            print_table(
                "LLaMA-shaped causal LM, heads only: skid's head choice and the candidates it "
                f"chooses among (calibration windows of seed {seed})",
                ["heads", "candidates", "calibration", "rms head error", "perplexity"],
                heads_rows(steps, n_calib, n_test, args.cache, seed),
                ["s", "s", "s", "s", ".3f"])
        rounds = 2 if args.quick else args.rounds
        print_table(
            f"cost of the held-out judge: process CPU time of fit (1 per group, original), "
            f"median of {rounds} interleaved rounds",
            ["heads fit", "CPU s", "÷ without the judge"],
            heads_cost(steps, n_calib, args.cache, rounds), ["s", ".3f", ".3f"])


if __name__ == "__main__":
    main()
