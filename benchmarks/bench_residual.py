"""CNN residual streams: agreement at equal FLOPs with and without ``prune="residual"``.

Two small residual CNNs are trained here on the digits (``tests/nn/digits.py`` split: 1,000
training images, 400 unlabeled calibration images, 397 held out), in torchvision's layouts:

- **ResNet** (basic blocks): stem 1→32, a stage of two identity blocks at 32 channels, a
  stage at 64 opened by a strided block with a projection shortcut, global pool, linear head;
- **MobileNetV2** (inverted residuals, expansion 4): stem 1→16, a stage at 24 (a strided block,
  then two residual ones), a stage at 32 (one block, one residual), 1×1 head to 128, pool, fc.

Each is compressed under ``target_flops`` with ``prune="channels"`` (the block interiors: what
skid pruned before) and with ``prune=("channels", "residual")`` (the stages' streams as well,
each by the joint ID of its readings), one-pass (``"original"``) and ``"corrective"``
calibration; and, one-pass, the stream's error curve taken as the root *mean* square of its
readings' errors (as for a gate's readings) instead of skid's root *sum* square. Reported:
FLOPs and parameters kept, held-out top-1 agreement with the original model and accuracy, mean
over the seeds. Deterministic on one machine (seeded training).

    python benchmarks/bench_residual.py            # about 6 minutes on one core
    python benchmarks/bench_residual.py --quick    # one seed, 1 epoch, one budget
"""

from __future__ import annotations

import argparse
import contextlib
from unittest import mock

import numpy as np
import torch
from _models import print_table, set_threads
from torch import nn

from skid import NetworkCompressor
from skid._demo import fit_classifier
from skid.metrics import top1_agreement
from skid.nn import _calibration, _joint
from tests.nn.digits import digits_data
from tests.nn.models import BasicBlock, InvertedResidual

PRUNE = {"channels": ("channels",), "channels + residual": ("channels", "residual"),
         "channels + residual, readings averaged": ("channels", "residual")}


def averaged_readings(label: str):
    """For the ablation: every unit's error is the root mean square of its readings'."""
    if "averaged" not in label:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    for module in (_calibration, _joint):
        stack.enter_context(mock.patch.object(module, "sums_readings", lambda unit: False))
    return stack


class DigitsResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(32), nn.ReLU(inplace=True))
        self.layer1 = nn.Sequential(BasicBlock(32, 32), BasicBlock(32, 32))
        self.layer2 = nn.Sequential(BasicBlock(32, 64, stride=2), BasicBlock(64, 64))
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class DigitsMobileNetV2(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(16), nn.ReLU6(inplace=True))
        self.blocks = nn.Sequential(
            InvertedResidual(16, 24, 2), InvertedResidual(24, 24, 1), InvertedResidual(24, 24, 1),
            InvertedResidual(24, 32, 1), InvertedResidual(32, 32, 1))
        self.head = nn.Sequential(nn.Conv2d(32, 128, 1, bias=False), nn.BatchNorm2d(128),
                                  nn.ReLU6(inplace=True))
        self.fc = nn.Linear(128, 10)

    def forward(self, x):
        x = self.head(self.blocks(self.stem(x)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


MODELS = {"ResNet": DigitsResNet, "MobileNetV2": DigitsMobileNetV2}


def trained(name: str, seed: int, epochs: int):
    data = digits_data(seed)
    torch.manual_seed(seed)
    model = fit_classifier(MODELS[name](), data.X_train, data.y_train, epochs=epochs,
                           batch_size=50, seed=seed)
    return model, data


def measure(model, data, budget, prune, calibration) -> dict:
    nc = NetworkCompressor(model, target_flops=budget, prune=prune, calibration=calibration)
    nc.fit(data.X_calib)
    with torch.no_grad():
        original = model(data.X_test)
        small = nc.compressed_model_(data.X_test)
    streams = [f"{r['width_after']}/{r['width_before']}" for r in nc.layers_
               if r["kind"] == "residual"]
    return {
        "flops": nc.flops_["after"] / nc.flops_["before"],
        "params": nc.params_["after"] / nc.params_["before"],
        "agreement": top1_agreement(small.numpy(), original.numpy()),
        "accuracy": float((small.argmax(1) == data.y_test).float().mean()),
        "streams": " ".join(streams) or "-",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch/BLAS threads (default 1: tiny batches; 0 leaves them)")
    args = parser.parse_args()
    set_threads(args.threads)
    seeds = (0,) if args.quick else (0, 1)
    epochs = 1 if args.quick else 15
    budgets = (0.5,) if args.quick else (0.75, 0.5, 0.35, 0.25)
    calibrations = ("original",) if args.quick else ("original", "corrective")
    for name in MODELS:
        results, base_acc = {}, []
        for seed in seeds:
            model, data = trained(name, seed, epochs)
            with torch.no_grad():
                base_acc.append(float((model(data.X_test).argmax(1) == data.y_test)
                                      .float().mean()))
            for budget in budgets:
                for calibration in calibrations:
                    for label, prune in PRUNE.items():
                        if "averaged" in label and calibration != "original":
                            continue
                        with averaged_readings(label):
                            result = measure(model, data, budget, prune, calibration)
                        results.setdefault((budget, calibration, label), []).append(result)
        rows = []
        for (budget, calibration, label), runs in results.items():
            mean = {k: float(np.mean([r[k] for r in runs])) for k in runs[0] if k != "streams"}
            rows.append([f"{budget:.2f}", calibration, label, 100 * mean["flops"],
                         100 * mean["params"], 100 * mean["agreement"], 100 * mean["accuracy"],
                         runs[0]["streams"]])
        print_table(
            f"digits {name}: held-out agreement at equal FLOPs (mean of {len(seeds)} seeds; "
            f"original accuracy {100 * np.mean(base_acc):.1f} %)",
            ["target_flops", "calibration", "prune", "FLOPs kept %", "params kept %",
             "agreement %", "accuracy %", "streams (seed 0)"],
            rows, ["s", "s", "s", ".1f", ".1f", ".1f", ".1f", "s"])


if __name__ == "__main__":
    main()
