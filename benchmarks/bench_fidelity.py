"""Fidelity of ID compression against magnitude and random channel pruning, no fine-tuning.

On the trained digits CNN (``tests/nn/digits.py``) and an MLP trained here on the flattened
digits (64 → 128 → 64 → 10), calibrated on the 400 calibration digits and scored on the 397
held-out ones: top-1 agreement with the original model and accuracy against the labels, as the
FLOPs kept go from 1.0 down to 0.2, for

- ID, ``tol`` sweep, ``target_flops`` sweep and, for reference, a ``rank`` sweep (the same
  fraction of every layer) (``NetworkCompressor``);
- at the SAME per-layer widths as each ID setting, through skid's own surgery
  (``apply_selection`` with ``T`` = the identity rows of the kept channels, i.e. the consumer
  just drops the other input channels):

  - L1: keep the producer's output channels with the largest L1 norm of their weights;
  - random: random channels (median over seeds);
  - ID without T: the ID's own channels, consumer sliced — the fold is what makes the method.

Prints one table per model and sweep, a summary at 50 % and 25 % of the FLOPs, target_flops
against the widest uniform cut within the same FLOPs (held out: a measurement, not a
guarantee; with and without fit_intercept, then over random resplits of the calibration and
held-out digits), and saves
agreement vs FLOPs kept (both models, one panel each) to ``docs/images/fidelity_digits.png``.

Then the three ``calibration`` modes at the same per-layer widths (a ``target_flops`` and a
``rank`` sweep): ``"original"``, ``"sequential"``, ``"corrective"`` with its default choice of
channels (from the compressed Gram) and with the alternative (greedy on the cross statistic).

Then (with ``transformers`` installed) a small LLaMA-shaped causal LM trained here on CPython's
standard-library sources (``benchmarks/_llm.py``): held-out perplexity at half its SwiGLU MLP
width for ID, ID without T and magnitude pruning (Torch-Pruning's group L2 importance) at the
same widths; then its residual stream (``benchmarks/_llm_stream.py``): the hidden size at
87.5-50 % by rotation, its variants and the joint ID, and one FLOP budget over stream + MLP +
heads against MLP + heads alone and a SliceGPT-style baseline (``benchmarks/_slicegpt.py``).

    python benchmarks/bench_fidelity.py            # full sweep + plot (under a minute)
    python benchmarks/bench_fidelity.py --quick    # 2 settings per sweep, no plot
"""

from __future__ import annotations

import argparse
import copy
import statistics

import numpy as np
import torch
from _baselines import sliced
from _models import REPO, print_table, set_threads, train_digits_cnn, train_digits_mlp

from skid import NetworkCompressor
from skid._policy import FLOAT32_GRAM_RELIABLE_ERROR
from skid.metrics import top1_agreement
from skid.nn import CorrectiveCalibration
from skid.nn._batches import Batches
from skid.nn._calibration import unit_statistics
from skid.nn._graph import find_units

TOLS = (0.01, 0.02, 0.04, 0.06, 0.09, 0.12, 0.16, 0.2, 0.25, 0.3, 0.4)
TARGETS = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.25, 0.2)
RANKS = (0.9, 0.8, 0.7, 0.6, 0.5, 0.45, 0.4, 0.35, 0.3)
SUMMARY_AT = (0.5, 0.25)
UNIFORM_TARGETS = (0.5, 0.3, 0.25, 0.1, 0.05)
RESAMPLED_TARGETS = (0.5, 0.3, 0.25, 0.1, 0.05)
MODE_TARGETS = (0.7, 0.5, 0.4, 0.3, 0.25, 0.2, 0.15, 0.1)
MODE_RANKS = (0.6, 0.5, 0.4, 0.3, 0.25, 0.2)
MODES = (("original", "gram"), ("sequential", "gram"), ("corrective", "gram"),
         ("corrective", "greedy"))
METHODS = ("ID", "ID without T", "L1", "random")
MIN_PLOTTED_FLOPS = 0.1
LABELS = {"tol": "ID, tol sweep (same error per layer)",
          "rank": "ID, rank sweep (same fraction per layer)"}
PLOT = REPO / "docs" / "images" / "fidelity_digits.png"


class Case:
    """A trained model with its calibration and test data, its units and ID statistics."""

    def __init__(self, name, model, X_calib, X_test, y_test):
        self.name, self.model = name, model
        self.X_calib, self.X_test, self.y_test = X_calib, X_test, y_test
        with torch.no_grad():
            self.reference = model(X_test).numpy()
        self.units, _ = find_units(copy.deepcopy(model), X_calib[:2])
        # the statistics NetworkCompressor uses for tol >= 1e-3 and target_flops: Gram of
        # float32 products, so the channels and errors match the fitted compressor's
        self.factorizations, _ = unit_statistics(
            copy.deepcopy(model), self.units, Batches(X_calib, 256), method="gram",
            precision="native")

    def distance(self, model) -> float:
        """Frobenius distance of the model's held-out outputs from the original's."""
        with torch.no_grad():
            return float(np.linalg.norm(model(self.X_test).numpy() - self.reference))

    def score(self, model) -> tuple[float, float]:
        """(agreement with the original, accuracy) on the held-out data."""
        with torch.no_grad():
            outputs = model(self.X_test).numpy()
        accuracy = float(np.mean(outputs.argmax(1) == self.y_test.numpy()))
        return top1_agreement(outputs, self.reference), accuracy


def cases() -> list[Case]:
    """The trained digits CNN and the digits MLP."""
    cnn, data = train_digits_cnn()
    mlp, _ = train_digits_mlp()
    return [
        Case("digits CNN", cnn, data.X_calib, data.X_test, data.y_test),
        Case("digits MLP", mlp, data.X_calib.flatten(1), data.X_test.flatten(1), data.y_test),
    ]


# ------------------------------------------------------------------------------- baselines


def l1_channels(model, unit, k) -> np.ndarray:
    """The ``k`` output channels of the producer with the largest L1 norm of their weights."""
    weight = dict(model.named_modules())[unit.producer].weight.detach()
    norms = weight.abs().flatten(1).sum(1).numpy()
    return np.argsort(-norms, kind="stable")[:k]


def baseline_scores(case, widths, seeds) -> dict:
    """``{method: (agreement, accuracy)}`` of the baselines at these per-unit widths."""
    id_keeps = [fac.select(k)[0] for fac, k in zip(case.factorizations, widths, strict=True)]
    l1_keeps = [l1_channels(case.model, u, k) for u, k in zip(case.units, widths, strict=True)]
    scores = {
        "ID without T": case.score(sliced(case.model, case.units, id_keeps)),
        "L1": case.score(sliced(case.model, case.units, l1_keeps)),
    }
    random = []
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        keeps = [rng.choice(u.width, k, replace=False) for u, k in zip(case.units, widths,
                                                                        strict=True)]
        random.append(case.score(sliced(case.model, case.units, keeps)))
    scores["random"] = tuple(statistics.median(s[i] for s in random) for i in range(2))
    return scores


# ----------------------------------------------------------------------------------- sweeps


def evaluate(case, setting, seeds) -> dict:
    """One ID setting and the baselines at its widths: a row of the results."""
    nc = NetworkCompressor(case.model, **setting).fit(case.X_calib)
    if [row["producer"] for row in nc.layers_] != [u.producer for u in case.units]:
        raise RuntimeError("NetworkCompressor found other units than find_units.")
    widths = [row["width_after"] for row in nc.layers_]
    for fac, row in zip(case.factorizations, nc.layers_, strict=True):
        # below what float32 products resolve, the compressor recomputes on a finer route
        resolved = row["error"] >= FLOAT32_GRAM_RELIABLE_ERROR
        if resolved and abs(fac.errors[row["width_after"]] - row["error"]) > 1e-6:
            raise RuntimeError("The benchmark's statistics differ from the compressor's.")
    scores = {"ID": case.score(nc.compressed_model_), **baseline_scores(case, widths, seeds)}
    return {"setting": setting, "widths": widths,
            "flops": nc.flops_["after"] / nc.flops_["before"], "scores": scores}


def sweep(case, settings, seeds) -> list[dict]:
    """Rows for a list of ID settings, plus the uncompressed model as the first row."""
    full = [u.width for u in case.units]
    rows = [{"setting": {}, "widths": full, "flops": 1.0,
             "scores": dict.fromkeys(METHODS, case.score(case.model))}]
    return rows + [evaluate(case, setting, seeds) for setting in settings]


def print_sweep(case, title, rows) -> None:
    """One table: setting, FLOPs kept, widths, agreement and accuracy per method (%)."""
    table = []
    for row in rows:
        setting = ", ".join(f"{k}={v:g}" for k, v in row["setting"].items()) or "original"
        cells = [f"{100 * row['scores'][m][0]:.1f} / {100 * row['scores'][m][1]:.1f}"
                 for m in METHODS]
        table.append((setting, row["flops"], "-".join(map(str, row["widths"])), *cells))
    print_table(
        f"{case.name}, {title}: top-1 agreement / accuracy on {len(case.y_test)} held-out "
        f"digits (%), no fine-tuning; baselines at the ID's per-layer widths",
        ["ID setting", "FLOPs kept", "widths", *METHODS],
        table, ["s", ".3f", "s", *["s"] * len(METHODS)],
    )


def print_summary(results) -> None:
    """Agreement of every method near each FLOPs fraction of SUMMARY_AT, per ID sweep."""
    table = []
    for name, sweeps in results.items():
        for fraction in SUMMARY_AT:
            for rows in sweeps.values():
                row = min(rows[1:], key=lambda r: abs(r["flops"] - fraction))  # noqa: B023
                if abs(row["flops"] - fraction) > 0.05:
                    continue
                agreement = [100 * row["scores"][m][0] for m in METHODS]
                setting = ", ".join(f"{k}={v:g}" for k, v in row["setting"].items())
                table.append((name, setting, row["flops"], *agreement,
                              agreement[0] - max(agreement[1:])))
    print_table(
        f"summary: top-1 agreement with the original (%) near {', '.join(map(str, SUMMARY_AT))}"
        " of the FLOPs, every method at the ID setting's widths",
        ["model", "ID setting", "FLOPs kept", *METHODS, "ID − best other (points)"],
        table, ["s", "s", ".3f", *[".1f"] * len(METHODS), "+.1f"],
    )


# ------------------------------------------------------------------------ calibration modes


def fit_mode(case, calibration, selection, setting) -> NetworkCompressor:
    """A compressor fitted with ``calibration``; ``selection`` picks corrective's channels."""
    if calibration == "corrective":
        calibration = CorrectiveCalibration(selection=selection)
    return NetworkCompressor(case.model, calibration=calibration, **setting).fit(case.X_calib)


def mode_label(calibration, selection) -> str:
    if calibration != "corrective":
        return calibration
    return f"corrective ({'Gram J' if selection == 'gram' else 'greedy J'})"


def mode_sweep(case, settings) -> list[tuple]:
    """Per setting: FLOPs kept, widths, and (agreement, accuracy) of every mode."""
    rows = []
    for setting in settings:
        fits = [fit_mode(case, c, s, setting) for c, s in MODES]
        widths = {tuple(r["width_after"] for r in nc.layers_) for nc in fits}
        if len(widths) != 1:
            raise RuntimeError(f"The modes chose different widths at {setting}: {widths}")
        kept = fits[0].flops_["after"] / fits[0].flops_["before"]
        rows.append((setting, kept, widths.pop(),
                     [case.score(nc.compressed_model_) for nc in fits]))
    return rows


def print_modes(case, title, rows) -> None:
    """Agreement / accuracy of each calibration mode at the same widths (%)."""
    labels = [mode_label(c, s) for c, s in MODES]
    table = []
    for setting, kept, widths, scores in rows:
        name = ", ".join(f"{k}={v:g}" for k, v in setting.items())
        best_other = max(scores[0][0], scores[1][0])
        table.append((name, kept, "-".join(map(str, widths)),
                      *[f"{100 * a:.1f} / {100 * b:.1f}" for a, b in scores],
                      100 * (scores[2][0] - best_other)))
    print_table(
        f"{case.name}, calibration modes, {title}: top-1 agreement / accuracy on "
        f"{len(case.y_test)} held-out digits (%), same widths for every mode",
        ["setting", "FLOPs kept", "widths", *labels, "corrective − best other (points)"],
        table, ["s", ".3f", "s", *["s"] * len(labels), "+.1f"],
    )


def widest_uniform_cut(case, budget, **kwargs) -> NetworkCompressor:
    """``rank=r`` for the largest fraction r of the units' widths whose FLOPs fit ``budget``."""
    fractions = sorted({k / u.width for u in case.units for k in range(1, u.width + 1)})
    lo, hi = 0, len(fractions) - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        nc = NetworkCompressor(case.model, rank=fractions[mid], **kwargs).fit(case.X_calib)
        if nc.flops_["after"] <= budget * nc.flops_["before"]:
            lo = mid
        else:
            hi = mid - 1
    return NetworkCompressor(case.model, rank=fractions[lo], **kwargs).fit(case.X_calib)


def against_uniform(case, target, **kwargs) -> tuple:
    """target_flops and the widest uniform cut within the FLOPs it kept: (FLOPs kept, uniform
    rank, (agreement, held-out logit distance) of each)."""
    nc = NetworkCompressor(case.model, target_flops=target, **kwargs).fit(case.X_calib)
    kept = nc.flops_["after"] / nc.flops_["before"]
    uniform = widest_uniform_cut(case, kept, **kwargs)
    return kept, uniform.rank, [(case.score(m)[0], case.distance(m))
                                for m in (nc.compressed_model_, uniform.compressed_model_)]


def print_flops_vs_uniform(cases_, targets) -> None:
    """target_flops against the widest uniform cut at the same FLOPs, on held-out digits.

    On the calibration batch that judges, target_flops is never further from the model's
    outputs than the plain uniform cut, in distance or in any sample's direction; held out, it
    is a measurement (these numbers left the test suite: they depend on the trained weights).
    """
    table = []
    for case in cases_:
        for intercept in (False, True):
            for target in targets:
                kept, rank, ((ours, d_ours), (theirs, d_theirs)) = against_uniform(
                    case, target, fit_intercept=intercept)
                table.append((case.name, "yes" if intercept else "no", target, kept, rank,
                              100 * ours, 100 * theirs, 100 * (ours - theirs), d_ours,
                              d_theirs))
    print_table(
        "target_flops vs the widest uniform cut (same fraction of every layer) within the same "
        "FLOPs: top-1 agreement on the held-out digits (%) and distance of the logits from the "
        "original's",
        ["model", "fit_intercept", "target_flops", "FLOPs kept", "uniform rank", "target_flops",
         "uniform", "difference (points)", "distance, target_flops", "distance, uniform"],
        table, ["s", "s", "g", ".3f", ".3f", ".1f", ".1f", "+.1f", ".1f", ".1f"],
    )


def resplit(case, seed) -> Case:
    """``case`` with its 797 calibration and held-out digits shuffled into 400 and 397."""
    X, y = torch.cat([case.X_calib, case.X_test]), case.y_test
    order = torch.as_tensor(np.random.default_rng(seed).permutation(len(X)))
    n = len(case.X_calib)
    labels = torch.cat([torch.full((n,), -1, dtype=y.dtype), y])  # calibration: unlabeled
    other = copy.copy(case)
    other.X_calib, other.X_test, other.y_test = X[order[:n]], X[order[n:]], labels[order[n:]]
    with torch.no_grad():
        other.reference = case.model(other.X_test).numpy()
    return other


def print_resampled(cases_, targets, splits) -> None:
    """The comparison of :func:`print_flops_vs_uniform` over ``splits`` reshuffles of the
    calibration and held-out digits: one split's 397 digits decide a few points by chance."""
    table = []
    for case in cases_:
        for intercept in (False, True):
            for target in targets:
                diffs = []
                for seed in range(splits):
                    _, _, ((ours, _), (theirs, _)) = against_uniform(
                        resplit(case, seed), target, fit_intercept=intercept)
                    diffs.append(100 * (ours - theirs))
                diffs = np.array(diffs)
                table.append((case.name, "yes" if intercept else "no", target, diffs.mean(),
                              f"{(diffs > 0).sum()}/{(diffs == 0).sum()}/{(diffs < 0).sum()}",
                              diffs.min(), diffs.max()))
    print_table(
        f"target_flops − widest uniform cut, top-1 agreement (points) over {splits} random "
        "400/397 splits of the calibration and held-out digits (accuracy not scored: the "
        "calibration digits carry no labels here)",
        ["model", "fit_intercept", "target_flops", "mean", "wins/ties/losses", "worst", "best"],
        table, ["s", "s", "g", "+.2f", "s", "+.1f", "+.1f"],
    )


def plot(results, path) -> None:
    """Agreement vs FLOPs kept, one panel per model, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4.2), sharey=True)
    styles = {"ID": ("C0", "o", "-"), "ID without T": ("C3", "s", "--"),
              "L1": ("C1", "^", "--"), "random": ("C7", "v", ":")}
    for ax, (name, sweeps) in zip(np.atleast_1d(axes), results.items(), strict=True):
        for kind, color, marker in (("tol", "C2", "x"), ("rank", "C4", "+")):
            rows = sweeps[kind]
            rows = [r for r in rows if r["flops"] >= MIN_PLOTTED_FLOPS]
            ax.plot([r["flops"] for r in rows], [100 * r["scores"]["ID"][0] for r in rows],
                    color=color, marker=marker, linestyle="-", label=LABELS[kind])
        for method, (color, marker, line) in styles.items():
            rows = sweeps["target_flops"]
            label = "ID, target_flops sweep" if method == "ID" else method
            ax.plot([r["flops"] for r in rows], [100 * r["scores"][method][0] for r in rows],
                    color=color, marker=marker, linestyle=line, label=label)
        ax.set_title(f"{name}: no fine-tuning")
        ax.set_xlabel("FLOPs kept (fraction of the original)")
        ax.set_xlim(1.03, MIN_PLOTTED_FLOPS - 0.03)  # inverted: compression grows rightwards
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel("top-1 agreement with the original (%)")
    np.atleast_1d(axes)[0].legend(fontsize=8, loc="lower left")
    fig.suptitle("Same per-layer widths for every method (those of the ID's target_flops "
                 "sweep); random: median of seeds", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"\nplot saved to {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 2 settings per sweep, 1 random seed, no plot")
    parser.add_argument("--seeds", type=int, default=5, help="random-pruning seeds")
    parser.add_argument("--plot", default=None,
                        help=f"where to save the plot (default {PLOT.relative_to(REPO)}; "
                             "none in --quick mode unless given)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: default)")
    parser.add_argument("--splits", type=int, default=None,
                        help="random calibration/held-out splits for the target_flops vs "
                             "uniform comparison (default 10, 2 with --quick; 0: none)")
    args = parser.parse_args()
    set_threads(args.threads)
    grids = {"tol": TOLS, "target_flops": TARGETS, "rank": RANKS}
    if args.quick:
        grids = {"tol": (0.05, 0.2), "target_flops": (0.5, 0.25), "rank": (0.5,)}
    seeds = 1 if args.quick else args.seeds
    if args.splits is None:
        args.splits = 2 if args.quick else 10
    results = {}
    all_cases = cases()
    for case in all_cases:
        results[case.name] = {kind: sweep(case, [{kind: v} for v in values], seeds)
                              for kind, values in grids.items()}
        for kind, rows in results[case.name].items():
            print_sweep(case, f"{kind} sweep", rows)
    print_summary(results)
    print_flops_vs_uniform(all_cases, (0.25,) if args.quick else UNIFORM_TARGETS)
    if args.splits:
        print_resampled(all_cases, (0.25,) if args.quick else RESAMPLED_TARGETS, args.splits)
    path = args.plot or (None if args.quick else PLOT)
    if path:
        plot(results, REPO / path)  # an absolute path stays as it is
    targets, ranks = ((0.5, 0.1), (0.3,)) if args.quick else (MODE_TARGETS, MODE_RANKS)
    for case in all_cases:
        print_modes(case, "target_flops sweep",
                    mode_sweep(case, [{"target_flops": t} for t in targets]))
        print_modes(case, "rank sweep", mode_sweep(case, [{"rank": r} for r in ranks]))
    print_llm(steps=20 if args.quick else 800, n_calib=32 if args.quick else 128,
              n_test=32 if args.quick else 512)


def print_llm(steps: int, n_calib: int, n_test: int) -> None:
    """Held-out perplexity of the stdlib-trained LLaMA at half MLP width, per method."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("\n(transformers is not installed: no causal-LM table)")
        return
    from _llm import HEADS, KV_HEADS, SEQ, half_mlp_table, heads_table

    rows, facts = half_mlp_table(steps, n_calib, n_test)
    print_table(
        f"LLaMA-shaped causal LM ({facts['steps']} steps on {facts['train tokens']:,} bytes of "
        f"CPython's Lib/*.py; {n_calib}×{SEQ} calibration tokens): held-out perplexity on "
        f"{n_test}×{SEQ} tokens of other files, both MLPs at half width, no fine-tuning",
        ["method", "MLP width", "FLOPs kept", "perplexity", "÷ original"],
        rows, ["s", "d", ".3f", ".3f", ".3f"])
    print_table(
        f"LLaMA-shaped causal LM, attention heads ({HEADS} heads in {KV_HEADS} key/value "
        f"groups per layer): held-out perplexity at equal widths, no fine-tuning",
        ["setting", "method", "heads kept", "MLP width", "FLOPs kept", "perplexity",
         "÷ original"],
        heads_table(steps, n_calib, n_test), ["s", "s", "d", "d", ".3f", ".3f", ".3f"])
    print_stream(steps, n_calib, n_test, quick=steps < 100)


def print_stream(steps: int, n_calib: int, n_test: int, quick: bool = False) -> None:
    """The same LM's residual stream (hidden size): methods, then with the other axes."""
    from _llm import HIDDEN
    from _llm_stream import combined_table, stream_rank, stream_table

    rank = stream_rank(steps, n_calib)
    print(f"\nstream directions (of {HIDDEN}) for 1 / 5 / 10 % relative error of the "
          f"normalized stream: {rank[0.01]} / {rank[0.05]} / {rank[0.1]} (a toy model with a "
          "byte vocabulary: a real LLM's stream differs)")
    print_table(
        "LLaMA-shaped causal LM, residual stream (hidden size) pruned alone: held-out "
        "perplexity, no fine-tuning",
        ["method", "hidden kept", "FLOPs kept", "perplexity", "÷ original"],
        stream_table(steps, n_calib, n_test, **({"kept": (0.75,)} if quick else {})),
        ["s", "d", ".3f", ".3f", ".3f"])
    print_table(
        "LLaMA-shaped causal LM, one target_flops budget over the axes: held-out perplexity",
        ["target_flops", "axes", "hidden", "FLOPs kept", "layer params kept", "perplexity",
         "÷ original"],
        combined_table(steps, n_calib, n_test, **({"budgets": (0.65,)} if quick else {})),
        ["s", "s", "d", ".3f", ".3f", ".3f", ".3f"])


if __name__ == "__main__":
    main()
