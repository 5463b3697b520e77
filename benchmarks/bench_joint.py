"""How a channel group whose consumers read different tensors should choose its channels.

An EfficientNet-style MBConv block with a squeeze-excitation gate, trained here on the digits
(``tests/nn/digits.py`` data): its expanded width is one channel group read by two consumers,
the SE gate's ``fc1`` (the pooled activations: one row per image) and the projection (the gated
activations: one row per pixel). Only that group is pruned, to half and a quarter of its width,
with each consumer's own least-squares ``T_c``, and the selection ``J`` taken from

- **stack, unit norm each** (skid): the ID of ``[Z_fc1/‖Z_fc1‖; Z_proj/‖Z_proj‖]``;
- **stack, raw**: the ID of ``[Z_fc1; Z_proj]`` (rows count: the per-pixel reading dominates);
- **projection only** / **fc1 only**: the ID of one reading;
- and, for reference, skid's ``J`` with one shared ``T`` for both consumers.

Reported: each reading's relative ID error and the held-out top-1 agreement with the original
model and relative error of its logits. Deterministic on one machine (seeded training).

    python benchmarks/bench_joint.py            # about 20 s
    python benchmarks/bench_joint.py --quick    # fewer epochs, one width
"""

from __future__ import annotations

import argparse
import copy

import numpy as np
import torch
from _models import print_table, set_threads
from torch import nn

from skid._demo import fit_classifier
from skid._linalg import factorize_triangular
from skid.metrics import top1_agreement
from skid.nn._batches import Batches
from skid.nn._calibration import unit_statistics
from skid.nn._graph import find_units
from skid.nn._plan import Selection
from skid.nn._surgery import apply_selection
from tests.nn.blocks import SqueezeExcite
from tests.nn.digits import digits_data


class SEDigits(nn.Module):
    """Stem 1→16, MBConv (expand 64, depthwise, SE 64→8→64, project 16, residual), head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.SiLU())
        self.expand = nn.Sequential(nn.Conv2d(16, 64, 1), nn.BatchNorm2d(64), nn.SiLU())
        self.depthwise = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1, groups=64),
                                       nn.BatchNorm2d(64), nn.SiLU())
        self.se = SqueezeExcite(64, 8)
        self.project = nn.Sequential(nn.Conv2d(64, 16, 1), nn.BatchNorm2d(16))
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.project(self.se(self.depthwise(self.expand(x))))
        return self.head(x.mean((2, 3)))


def relative_error(factor, keep, T) -> float:
    """‖Z − Z[:, J] T‖ / ‖Z‖ from a square-root factor R of Z (RᵀR = ZᵀZ)."""
    return float(np.linalg.norm(factor - factor[:, keep] @ T) / np.linalg.norm(factor))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 2 epochs, one width")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: default)")
    args = parser.parse_args()
    set_threads(args.threads)
    data = digits_data()
    seeds = (0,) if args.quick else (0, 1, 2)
    fractions = (0.5,) if args.quick else (0.75, 0.5, 0.25)
    results = {}
    for seed in seeds:
        torch.manual_seed(seed)
        model = fit_classifier(SEDigits(), data.X_train, data.y_train,
                               epochs=2 if args.quick else 15, seed=seed)
        for key, row in one_model(model, data, fractions).items():
            results.setdefault(key, []).append(row)
    rows = [(name, k, *np.mean(values, axis=0)) for (k, name), values in results.items()]
    print_table(
        "SE-gated expanded width (expand.0 + se.fc2 → se.fc1, project.0) pruned alone, digits "
        f"SE-CNN, mean of {len(seeds)} trained seeds: reading errors on {len(data.X_calib)} "
        f"calibration digits, agreement and logit error on {len(data.X_test)} held-out ones",
        ["J from", "kept", "fc1 reading err", "projection reading err", "agreement %",
         "logit rel. err"],
        rows, ["s", "d", ".4f", ".4f", ".1f", ".4f"])


def one_model(model, data, fractions) -> dict:
    """(kept, method) -> [fc1 error, projection error, agreement %, logit error]."""
    with torch.no_grad():
        reference = model(data.X_test)
    units, _ = find_units(copy.deepcopy(model), data.X_calib[:2])
    group = next(u for u in units if u.n_readings == 2)
    (joint,), _ = unit_statistics(copy.deepcopy(model), [group], Batches(data.X_calib, 100),
                                  method="qr")
    R_fc1, R_proj = joint.factors
    eps = float(np.finfo(np.float32).eps)
    selections = {
        "stack, unit norm each (skid)": joint.perm,
        "stack, raw": factorize_triangular(np.vstack([R_fc1, R_proj]), eps).perm,
        "projection only": factorize_triangular(R_proj, eps).perm,
        "fc1 only": factorize_triangular(R_fc1, eps).perm,
    }
    rows = {}
    for fraction in fractions:
        k = int(group.width * fraction)
        for name, perm in selections.items():
            rows[k, name] = score(model, group, joint, np.sort(perm[:k]), data, reference,
                                  shared=False)
        rows[k, "skid's J, one shared T"] = score(model, group, joint, np.sort(joint.perm[:k]),
                                                  data, reference, shared=True)
    return rows


def score(model, group, joint, keep, data, reference, shared):
    """One row: the group pruned to ``keep`` with per-consumer (or one shared) T."""
    per_reading = joint.interpolations(keep)
    if shared:  # the least-squares T of the normalized stack, for both consumers
        _, T = joint.select(len(keep))
        order = np.argsort(joint.perm[:len(keep)])
        per_reading = [T[order]] * 2
    folds = tuple(torch.as_tensor(per_reading[c.reads]) for c in group.consumers)
    pruned = copy.deepcopy(model)
    apply_selection(pruned, Selection(group, torch.as_tensor(keep), folds[0], float("nan"),
                                      interpolations=folds))
    with torch.no_grad():
        outputs = pruned(data.X_test)
    errors = [relative_error(f, keep, T) for f, T in zip(joint.factors, per_reading,
                                                          strict=True)]
    gap = float(torch.linalg.norm(outputs - reference) / torch.linalg.norm(reference))
    return [*errors, 100 * top1_agreement(outputs.numpy(), reference.numpy()), gap]


if __name__ == "__main__":
    main()
