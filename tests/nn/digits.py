"""A small CNN trained on sklearn's bundled digits (8×8 images), for tests and benchmarks.

Training takes a few seconds on one CPU core and is deterministic for a given seed. The
trained weights are cached per process, and every call returns a fresh copy.
"""

from __future__ import annotations

import copy
import functools

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

from skid._demo import fit_classifier

__all__ = ["DigitsData", "digits_data", "make_digits_cnn", "train_digits_cnn"]


class DigitsData:
    """Digits as float32 tensors (n, 1, 8, 8) scaled to [0, 1] and int64 labels, split three ways.

    ``train`` fits the network, ``calib`` is the unlabeled calibration set, ``test`` is held
    out for agreement and accuracy.
    """

    def __init__(self, seed: int = 0, n_train: int = 1000, n_calib: int = 400):
        images, labels = load_digits(return_X_y=True)
        order = np.random.default_rng(seed).permutation(len(labels))
        X = torch.as_tensor(images[order] / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
        y = torch.as_tensor(labels[order], dtype=torch.int64)
        calib_end = n_train + n_calib
        self.X_train, self.y_train = X[:n_train], y[:n_train]
        self.X_calib, self.y_calib = X[n_train:calib_end], y[n_train:calib_end]
        self.X_test, self.y_test = X[calib_end:], y[calib_end:]


def digits_data(seed: int = 0) -> DigitsData:
    """The digits split used by :func:`train_digits_cnn`."""
    return DigitsData(seed)


def make_digits_cnn() -> nn.Sequential:
    """Conv(1→16) BN ReLU, Conv(16→32) BN ReLU MaxPool, Conv(32→32) ReLU, Flatten, MLP.

    Units: 0→3 (through BN), 3→7 (BN, pool), 7→10 (flatten, 16 positions), 10→12.
    """
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10),
    )  # fmt: skip


@functools.lru_cache(maxsize=4)
def _trained_state(seed: int, epochs: int):
    """State dict of the CNN after ``epochs`` of Adam on the training split."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny batches: more threads only add contention
    try:
        return _train(seed, epochs)
    finally:
        torch.set_num_threads(threads)


def _train(seed: int, epochs: int):
    """Adam on the training split (batches of 50); the state dict of the result."""
    data = digits_data(seed)
    torch.manual_seed(seed)
    model = fit_classifier(
        make_digits_cnn(), data.X_train, data.y_train, epochs=epochs, batch_size=50, seed=seed
    )
    return copy.deepcopy(model.state_dict())


def train_digits_cnn(seed: int = 0, epochs: int = 8) -> tuple[nn.Module, DigitsData]:
    """A trained digits CNN (eval mode, a fresh copy each call) and its data split."""
    model = make_digits_cnn()
    model.load_state_dict(_trained_state(seed, epochs))
    return model.eval(), digits_data(seed)
