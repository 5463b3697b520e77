"""Scorers for a fitted :class:`skid.NetworkCompressor`, usable as ``GridSearchCV(scoring=...)``.

Each follows scikit-learn's ``scorer(estimator, X, y=None)`` signature and returns a float,
greater meaning better for the fidelity scores (``agreement``, ``accuracy``,
``output_similarity``). ``flops_kept`` and ``params_kept`` return the fraction of the original
model that is kept: lower means smaller, so pick among candidates with
:func:`skid.model_selection.most_compressed` rather than by maximizing them.

Examples
--------
>>> from sklearn.model_selection import GridSearchCV
>>> from skid import NetworkCompressor, metrics
>>> from skid.model_selection import most_compressed
>>> search = GridSearchCV(
...     NetworkCompressor(model),
...     {"tol": [0.3, 0.1, 0.03]},
...     scoring={"agreement": metrics.agreement, "flops": metrics.flops_kept},
...     refit=most_compressed(0.99),
... )  # doctest: +SKIP
"""

from __future__ import annotations

import numpy as np
from sklearn.utils.validation import check_is_fitted

__all__ = ["accuracy", "agreement", "flops_kept", "output_similarity", "params_kept"]


def agreement(estimator, X, y=None) -> float:
    """Fraction of samples on which the compressed and the original model agree on the top-1 class.

    Parameters
    ----------
    estimator : NetworkCompressor
        Fitted.
    X : tensor, ndarray or iterable of batches
        Inputs, batched like the calibration data.
    y : ignored
        Agreement is always measured against the original model.

    Returns
    -------
    float in [0, 1]
    """
    compressed, original = _both_outputs(estimator, X)
    return top1_agreement(compressed, original)


def accuracy(estimator, X, y) -> float:
    """Top-1 accuracy of the compressed model against the labels ``y`` (shape (n_samples,))."""
    if y is None:
        raise ValueError(
            "accuracy needs labels: call it with y (GridSearchCV passes the y given to fit). "
            "Use skid.metrics.agreement to compare with the original model instead."
        )
    check_is_fitted(estimator)
    predicted = estimator.predict(X)
    labels = _labels(y)
    if labels.shape[0] != predicted.shape[0]:
        raise ValueError(f"y has {labels.shape[0]} labels for {predicted.shape[0]} samples.")
    return float(np.mean(predicted == labels))


def output_similarity(estimator, X, y=None) -> float:
    """Mean cosine similarity between the compressed and the original outputs, per sample.

    Suited to embedding models, where there is no class to agree on. Two zero outputs count as
    identical (similarity 1).
    """
    compressed, original = _both_outputs(estimator, X)
    return mean_cosine_similarity(compressed, original)


def flops_kept(estimator, X=None, y=None) -> float:
    """FLOPs per sample of the compressed model over those of the original (lower is smaller)."""
    check_is_fitted(estimator)
    return _ratio(estimator.flops_)


def params_kept(estimator, X=None, y=None) -> float:
    """Parameters of the compressed model over those of the original (lower is smaller)."""
    check_is_fitted(estimator)
    return _ratio(estimator.params_)


def top1_agreement(outputs, reference) -> float:
    """Fraction of rows of two (n, classes) arrays with the same argmax."""
    outputs, reference = np.asarray(outputs), np.asarray(reference)
    if outputs.shape[0] == 0:
        raise ValueError("Cannot score on zero samples.")
    return float(np.mean(outputs.argmax(axis=1) == reference.argmax(axis=1)))


def mean_cosine_similarity(outputs, reference) -> float:
    """Mean over rows of the cosine similarity of two (n, d) arrays (computed in float64)."""
    a = np.asarray(outputs, dtype=np.float64)
    b = np.asarray(reference, dtype=np.float64)
    if a.shape[0] == 0:
        raise ValueError("Cannot score on zero samples.")
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    dots = np.einsum("ij,ij->i", a, b)
    both_zero = (norms == 0) & np.all(a == b, axis=1)
    cosine = np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), 0.0)
    return float(np.mean(np.where(both_zero, 1.0, cosine)))


def _both_outputs(estimator, X):
    """Outputs (n, outputs) of the compressed and of the original model on ``X``."""
    check_is_fitted(estimator)
    return estimator.transform(X), estimator._original_outputs(X)


def _labels(y) -> np.ndarray:
    """Labels as a 1-D NumPy array (accepts torch tensors)."""
    if hasattr(y, "detach"):
        y = y.detach().cpu().numpy()
    return np.asarray(y).reshape(-1)


def _ratio(sizes: dict) -> float:
    """``after / before`` of a ``{"before", "after"}`` dict."""
    return float(sizes["after"]) / float(sizes["before"]) if sizes["before"] else 1.0
