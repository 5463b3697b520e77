"""Attention heads of a vision transformer trained on the digits: ID vs ID without T vs
magnitude; and what ``nn.MultiheadAttention`` with fewer heads costs at inference.

1. Two small ViTs are trained here on scikit-learn's digits (8×8 images, patches of 2: 16
   tokens and a class token; 4 blocks of 8 heads): timm's layout (fused ``qkv`` → ``proj``,
   ``tests/nn/blocks.py``'s ``VisionTransformer``) and torchvision's (``nn.MultiheadAttention``
   in ``EncoderBlock``). Only heads are pruned (``prune="heads"``), at ``rank`` = fraction of
   heads kept in every block, calibrated on 400 unlabeled held-out digits. Per setting, top-1
   agreement with the uncompressed model and accuracy on 397 test digits, mean over training
   seeds, for: the ID (skid: heads by the block ID, ``T`` folded into the output projection),
   the ID's heads without ``T`` (the output projection just drops the other heads' columns),
   and magnitude (the heads with the largest squared norm of their query rows and output
   columns, without ``T``).
2. ``nn.TransformerEncoder`` (d_model 256, 8 heads, 4 layers; 32 sequences of 64 tokens), eval
   and no_grad: the original (its fused fast path), the compression at all heads (the plain
   class again: fast path), the same function as ``PrunedMultiheadAttention`` with all heads
   (the standard path: what the class change alone costs), and half the heads. Medians of
   ``--rounds`` interleaved rounds, one thread; ratios to the original in the same run.

    python benchmarks/bench_vit_heads.py            # three seeds (a few minutes)
    python benchmarks/bench_vit_heads.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import copy
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(Path(__file__).resolve().parent)]

from _baselines import heads_sliced  # noqa: E402
from _models import median_time, print_table, set_threads  # noqa: E402

from skid._demo import fit_classifier  # noqa: E402
from skid.nn import NetworkCompressor  # noqa: E402
from skid.nn._heads import HeadSelection  # noqa: E402
from skid.nn._mha import to_pruned  # noqa: E402
from tests.nn.blocks import TorchvisionViT, VisionTransformer  # noqa: E402
from tests.nn.digits import digits_data  # noqa: E402

RANKS = (0.75, 0.5, 0.25)
MODELS = {
    "timm ViT (qkv)": lambda: VisionTransformer(dim=64, depth=4, num_heads=8, patch=2,
                                                image=8, channels=1, classes=10),
    "torchvision ViT (MHA)": lambda: TorchvisionViT(image=8, patch=2, hidden_dim=64,
                                                    num_heads=8, depth=4, classes=10,
                                                    channels=1),
}


def train(name, seed, epochs):
    data = digits_data(seed)
    torch.manual_seed(seed)
    model = fit_classifier(MODELS[name](), data.X_train, data.y_train, epochs=epochs,
                           batch_size=50, lr=2e-3, seed=seed)
    return model, data


def predictions(model, X):
    with torch.no_grad():
        return model(X).argmax(1)


def magnitude(model, selection) -> HeadSelection:
    """As many heads as ``selection``, by the squared norm of their query rows and output
    columns (each head has its own keys and values here)."""
    unit = selection.unit
    d, H = unit.head_dim, unit.n_heads
    queries = model.get_submodule(unit.producer)
    q = (queries.in_proj_weight if unit.layout.form else queries.weight)[: H * d].detach()
    o = model.get_submodule(unit.consumer).weight.detach()
    score = q.pow(2).reshape(H, d, -1).sum((1, 2)) + o.pow(2).reshape(-1, H, d).sum((0, 2))
    heads = np.sort(np.argsort(-score.numpy(), kind="stable")[: selection.heads.size])
    return HeadSelection(unit, heads, heads, None, float("nan"))


def fidelity(seeds, ranks=RANKS, epochs=40) -> list:
    rows = []
    for name in MODELS:
        results = {}
        for seed in seeds:
            model, data = train(name, seed, epochs)
            reference = predictions(model, data.X_test)
            results.setdefault(("original", 1.0), []).append(
                (1.0, float((reference == data.y_test).float().mean())))
            for rank in ranks:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    nc = NetworkCompressor(model, rank=rank, prune="heads").fit(data.X_calib)
                candidates = {
                    "ID": nc.compressed_model_,
                    "ID without T": heads_sliced(model, nc.plan_.selections),
                    "magnitude": heads_sliced(model, [magnitude(model, s)
                                                      for s in nc.plan_.selections]),
                }
                for method, pruned in candidates.items():
                    out = predictions(pruned, data.X_test)
                    results.setdefault((method, rank), []).append(
                        (float((out == reference).float().mean()),
                         float((out == data.y_test).float().mean())))
        for (method, rank), values in results.items():
            agreement, accuracy = np.mean(values, axis=0)
            rows.append([name, f"{rank:.2f}", method, agreement, accuracy])
    return rows


def encoder(d_model=256, nhead=8, layers=4):
    layer = torch.nn.TransformerEncoderLayer(d_model, nhead, 4 * d_model, dropout=0.0,
                                             batch_first=True)
    torch.manual_seed(0)
    return torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False).eval()


def timings(rounds, width=256) -> list:
    model = encoder(width)
    X = torch.randn(32, 64, width, generator=torch.Generator().manual_seed(0))
    calibration = torch.randn(64, 64, width, generator=torch.Generator().manual_seed(1))
    full = NetworkCompressor(model, rank=1.0, tol=0, prune="heads", blocks=None).fit(
        calibration).compressed_model_
    standard = copy.deepcopy(model)
    for layer in standard.layers:
        to_pruned(layer.self_attn)
    half = NetworkCompressor(model, rank=0.5, prune="heads", blocks=None).fit(
        calibration).compressed_model_
    variants = {"original (fast path)": model, "compressed, all heads": full,
                "PrunedMultiheadAttention, all heads": standard,
                "PrunedMultiheadAttention, half the heads": half}
    with torch.no_grad():
        reference = model(X)
        exact = float((standard(X) - reference).abs().max())

        for m in variants.values():  # warm up
            m(X)
        times = {k: [] for k in variants}
        for _ in range(rounds):  # interleaved: the machine's load drifts alike for all
            for k, m in variants.items():
                times[k].append(median_time(lambda m=m: m(X), 1))
        seconds = {k: float(np.median(t)) for k, t in times.items()}
    base = seconds["original (fast path)"]
    return [[k, 1e3 * s, s / base] for k, s in seconds.items()], exact


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: one seed, 5 epochs, rank 0.5, a 64-wide encoder")
    parser.add_argument("--rounds", type=int, default=15, help="timing rounds (median)")
    parser.add_argument("--timing-only", action="store_true", help="only part 2")
    options = parser.parse_args()
    set_threads(1)
    seeds = (0,) if options.quick else (0, 1, 2)
    if not options.timing_only:
        print_table(f"heads of a ViT on the digits (prune='heads'; mean of seeds {seeds}; "
                    "agreement with the original on 397 test digits)",
                    ["model", "rank", "method", "agreement", "accuracy"],
                    fidelity(seeds, (0.5,), 5) if options.quick else fidelity(seeds),
                    ["s", "s", "s", ".3f", ".3f"])
    table, exact = timings(3, 64) if options.quick else timings(options.rounds)
    print_table(f"nn.TransformerEncoder ({64 if options.quick else 256} wide, 8 heads, 4 "
                "layers; 32 × 64 tokens), eval, no_grad, 1 thread",
                ["variant", "ms (median)", "× original"], table, ["s", ".1f", ".2f"])
    print(f"\nPrunedMultiheadAttention with all heads vs the original: max |difference| "
          f"{exact:.2e}")


if __name__ == "__main__":
    main()
