"""A small CNN trained on scikit-learn's bundled digits, for ``skid demo``, tests and docs.

Everything here runs offline in a few seconds on a CPU: the data is
:func:`sklearn.datasets.load_digits` (1,797 grayscale 8×8 images), the model is deliberately
wider than the task needs, the way trained networks usually are, so that compression has
something to find.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn


def load_digits_images(*, test_size=0.3, random_state=0):
    """Digits as float32 images of shape (n, 1, 8, 8) in [0, 1], split into train and test.

    Returns
    -------
    X_train, X_test : ndarray of shape (n_train, 1, 8, 8) and (n_test, 1, 8, 8)
    y_train, y_test : ndarray of shape (n_train,) and (n_test,), int64 labels 0-9
    """
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    labels = digits.target.astype(np.int64)
    return train_test_split(
        images, labels, test_size=test_size, random_state=random_state, stratify=labels
    )


def make_digits_cnn(*, channels=(32, 64), hidden=128, seed=0):
    """Conv-BN-ReLU ×2 → max-pool → flatten → Linear-ReLU → Linear, for 1×8×8 inputs.

    Three prunable units: conv → conv (through BatchNorm and ReLU), conv → Linear (through
    BatchNorm, ReLU, pooling and a flatten over 4×4 positions), Linear → Linear.
    """
    torch.manual_seed(seed)
    c1, c2 = channels
    return nn.Sequential(
        nn.Conv2d(1, c1, 3, padding=1),
        nn.BatchNorm2d(c1),
        nn.ReLU(),
        nn.Conv2d(c1, c2, 3, padding=1),
        nn.BatchNorm2d(c2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(c2 * 4 * 4, hidden),
        nn.ReLU(),
        nn.Linear(hidden, 10),
    )


def fit_classifier(model, X, y, *, epochs=10, batch_size=128, lr=3e-3, seed=0):
    """Adam on cross-entropy over minibatches in a seeded random order (deterministic).

    Parameters
    ----------
    model : nn.Module
        Initialized by the caller (seed its initialization for reproducible weights).
    X : ndarray or tensor of shape (n, ...)
    y : ndarray or tensor of shape (n,), int64 labels
    epochs, batch_size, lr, seed : training settings; ``seed`` fixes the batch order.

    Returns
    -------
    model : the same module, trained, in eval mode.
    """
    inputs, targets = torch.as_tensor(X), torch.as_tensor(y)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    shuffle = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(inputs), generator=shuffle).split(batch_size):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(inputs[batch]), targets[batch])
            loss.backward()
            optimizer.step()
    return model.eval()


def train_digits_cnn(X, y, *, epochs=10, batch_size=128, lr=3e-3, seed=0, **model_params):
    """Train :func:`make_digits_cnn` with :func:`fit_classifier`; same seed, same weights.

    Parameters
    ----------
    X : ndarray of shape (n, 1, 8, 8)
    y : ndarray of shape (n,)
    epochs, batch_size, lr, seed : training settings.
    **model_params : passed to :func:`make_digits_cnn`.

    Returns
    -------
    model : nn.Sequential in eval mode, on the CPU, float32.
    """
    model = make_digits_cnn(seed=seed, **model_params)
    return fit_classifier(model, X, y, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed)


def predict_labels(model, X, *, batch_size=512):
    """Argmax of ``model`` over ``X`` (ndarray or tensor), as an int64 ndarray of shape (n,)."""
    inputs = torch.as_tensor(X)
    with torch.no_grad():
        outputs = [model(batch) for batch in inputs.split(batch_size)]
    return torch.cat(outputs).argmax(dim=1).numpy()


def compress_and_score(model, X_calib, X_test, y_test, reference, **setting):
    """Compress ``model`` with one setting; measure its size, accuracy, agreement and time.

    Parameters
    ----------
    model : nn.Module
        The trained model (not modified).
    X_calib : ndarray of shape (n, 1, 8, 8)
        Unlabeled calibration images.
    X_test, y_test : ndarray of shape (n_test, 1, 8, 8) and (n_test,)
        Held-out images and labels.
    reference : ndarray of shape (n_test,)
        The original model's predictions on ``X_test``.
    **setting : one of ``tol=``, ``rank=``, ``target_flops=`` for :class:`NetworkCompressor`.

    Returns
    -------
    row : dict
        ``setting`` ("tol=0.1"), ``flops_kept``, ``params_kept``, ``accuracy``, ``agreement``,
        ``seconds`` (to fit), ``layers`` (the ``layers_`` report), ``widths`` (producer →
        kept width).
    """
    from . import NetworkCompressor

    start = time.perf_counter()
    compressor = NetworkCompressor(**setting).fit(model, X_calib)
    seconds = time.perf_counter() - start
    predicted = compressor.predict(X_test)
    return {
        "setting": ", ".join(f"{name}={value:g}" for name, value in setting.items()),
        "flops_kept": compressor.flops_["after"] / compressor.flops_["before"],
        "params_kept": compressor.params_["after"] / compressor.params_["before"],
        "accuracy": float((predicted == y_test).mean()),
        "agreement": float((predicted == reference).mean()),
        "seconds": seconds,
        "layers": compressor.layers_,
        "widths": {layer["producer"]: layer["width_after"] for layer in compressor.layers_},
    }


def _label_points(ax, rows):
    """Name every point on the agreement line, the original's too; points close along the
    FLOPs axis take turns above and below, further out each time, so labels do not overlap."""
    placed = []
    for row in sorted(rows, key=lambda r: r["flops_kept"]):
        x = row["flops_kept"]
        near = sum(1 for other in placed if abs(other - x) < 0.09)
        placed.append(x)
        dy = (8 + 9 * (near // 2)) * (1 if near % 2 == 0 else -1) - (4 if near % 2 else 0)
        ax.annotate(row["setting"], (x, row["agreement"]), fontsize=7, ha="center",
                    textcoords="offset points", xytext=(0, dy),
                    arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "0.5"} if near else None)


def plot_results(rows, path):
    """Accuracy and agreement against the fraction of FLOPs kept, one line per knob.

    ``rows[0]`` is the original model (it starts every line); the others are rows of
    :func:`compress_and_score`. Saved with the Agg backend (no display needed).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    for key, color in (("agreement", "C0"), ("accuracy", "C1")):
        for knob, marker, line in (("tol", "o", "-"), ("target_flops", "s", "--")):
            points = sorted(
                (row["flops_kept"], row[key]) for row in rows
                if row is rows[0] or row["setting"].startswith(f"{knob}=")
            )
            ax.plot(*zip(*points, strict=True), marker=marker, linestyle=line, color=color,
                    label=f"{key}, {knob} sweep")
    _label_points(ax, rows)
    ax.margins(x=0.08, y=0.12)  # room for the labels at the edges (the original's, top right)
    ax.set(xlabel="fraction of FLOPs kept", ylabel="top-1 accuracy / agreement",
           title="digits CNN compressed with the ID (no fine-tuning)")
    ax.grid(alpha=0.3)
    ax.legend()
    try:
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
