"""Scorers for a fitted :class:`skid.NetworkCompressor`, usable as ``GridSearchCV(scoring=...)``.

Each follows scikit-learn's ``scorer(estimator, X, y=None)`` signature and returns a float,
greater meaning better for the fidelity scores (``agreement``, ``accuracy``,
``output_similarity``). ``perplexity_ratio`` (compressed ÷ original perplexity, for language
models), ``flops_kept`` and ``params_kept`` are lower-is-better: pick among candidates with
:func:`skid.model_selection.most_compressed` rather than by maximizing them.

The class scores compare the top-1 class **per position**, along the output's class axis:
per sample for (n, classes) outputs, per token for (n, seq, vocab) logits, per pixel for
(n, C, H, W) maps. A Hugging Face ``ModelOutput`` is read by its ``logits``, and positions
where a dict batch's ``attention_mask`` is 0 (padding) are left out.

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

__all__ = [
    "accuracy",
    "agreement",
    "flops_kept",
    "output_similarity",
    "params_kept",
    "perplexity",
    "perplexity_ratio",
]


def agreement(estimator, X, y=None, *, axis=None) -> float:
    """Fraction of positions where the compressed and the original model agree on the top-1 class.

    Parameters
    ----------
    estimator : NetworkCompressor
        Fitted.
    X : tensor, ndarray, dict of those, or iterable of batches
        Inputs, batched like the calibration data. Positions where a dict batch's
        ``attention_mask`` is 0 are left out.
    y : ignored
        Agreement is always measured against the original model.
    axis : int, default=None
        The class axis of the model's output. None: axis 1 of a (n, classes) output or of
        (n, C, H, ...) maps, the last axis of (n, seq, vocab) logits. Give ``axis=1`` for
        (n, C, L) maps (in a grid search: ``functools.partial(agreement, axis=1)``).

    Returns
    -------
    float in [0, 1]
        Per position: per sample, token or pixel, over every position of every batch.
    """
    compressed, original = _both_outputs(estimator, X)
    hits = total = 0
    for ours, theirs, mask in zip(compressed.values, original.values, original.masks,
                                  strict=True):
        same = _top1(ours, axis) == _top1(theirs, axis)
        keep = _positions_kept(mask, same.shape)
        hits, total = hits + int(same[keep].sum()), total + int(keep.sum())
    return _fraction(hits, total)


def accuracy(estimator, X, y, *, axis=None) -> float:
    """Top-1 accuracy of the compressed model against the labels ``y``, per position.

    ``y`` holds one class per position of the output: shape (n_samples,) for (n, classes)
    outputs, (n, seq) for (n, seq, vocab) logits, (n, H, W) for (n, C, H, W) maps. Padding
    (``attention_mask == 0``) is left out; ``axis`` is as for :func:`agreement`.
    """
    if y is None:
        raise ValueError(
            "accuracy needs labels: call it with y (GridSearchCV passes the y given to fit). "
            "Use skid.metrics.agreement to compare with the original model instead."
        )
    check_is_fitted(estimator)
    outputs = estimator.outputs(X)
    predicted = [_top1(values, axis) for values in outputs.values]
    keep = [_positions_kept(m, p.shape) for m, p in zip(outputs.masks, predicted, strict=True)]
    labels = _labels(y)
    n = sum(len(p) for p in predicted)
    if labels.shape[0] != n:
        raise ValueError(f"y has {labels.shape[0]} labels for {n} samples.")
    shapes = {p.shape[1:] for p in predicted}
    if len(shapes) > 1 or labels.size != n * int(np.prod(next(iter(shapes)), dtype=int)):
        raise ValueError(
            f"y has shape {labels.shape}, but the outputs have {sorted(shapes)} positions per "
            "sample (after the class axis is taken out): give one label per position."
        )
    predicted, keep = np.concatenate(predicted), np.concatenate(keep)
    same = predicted == labels.reshape(predicted.shape)
    return _fraction(int(same[keep].sum()), int(keep.sum()))


def output_similarity(estimator, X, y=None) -> float:
    """Mean cosine similarity between the compressed and the original outputs, per sample.

    Suited to embedding models, where there is no class to agree on. Each sample's output is
    compared whole (flattened). Two zero outputs count as identical (similarity 1).
    """
    compressed, original = _both_outputs(estimator, X)
    return mean_cosine_similarity(compressed.flat(), original.flat())


def perplexity(estimator, X, y=None, *, original=False) -> float:
    """Perplexity of the compressed (or, with ``original=True``, the original) language model.

    ``exp`` of the mean cross-entropy of the next token over every predicted token: on the
    batches' ``labels`` when they carry them (shifted by one, ``-100`` ignored, as Hugging
    Face's causal LM loss), else on the token ids (``input_ids`` or a tensor of ids), where
    a position whose token or predecessor is padding (``attention_mask == 0``) is left out.
    The output must be (n, seq, vocab) logits. Lower is better.
    """
    check_is_fitted(estimator)
    return float(np.exp(_mean_next_token_loss(estimator.outputs(X, original=original))))


def perplexity_ratio(estimator, X, y=None) -> float:
    """Compressed ÷ original perplexity (see :func:`perplexity`); lower is better, 1 is equal.

    Usable in ``GridSearchCV(scoring=...)`` with
    ``most_compressed(max_perplexity_ratio=...)``; do not let ``GridSearchCV`` maximize it.
    """
    compressed, original = _both_outputs(estimator, X)
    return float(np.exp(_mean_next_token_loss(compressed) - _mean_next_token_loss(original)))


def flops_kept(estimator, X=None, y=None) -> float:
    """FLOPs per sample of the compressed model over those of the original (lower is smaller)."""
    check_is_fitted(estimator)
    return _ratio(estimator.flops_)


def params_kept(estimator, X=None, y=None) -> float:
    """Parameters of the compressed model over those of the original (lower is smaller)."""
    check_is_fitted(estimator)
    return _ratio(estimator.params_)


def top1_agreement(outputs, reference, *, axis=None) -> float:
    """Fraction of positions of two outputs with the same argmax along the class ``axis``
    (None: as :func:`agreement`; rows of two (n, classes) arrays)."""
    outputs, reference = np.asarray(outputs), np.asarray(reference)
    if outputs.shape[0] == 0:
        raise ValueError("Cannot score on zero samples.")
    return float(np.mean(_top1(outputs, axis) == _top1(reference, axis)))


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


def class_axis(ndim: int, axis=None) -> int:
    """The class axis of an ``ndim``-dimensional output (see :func:`agreement`), from 0."""
    if axis is None:
        axis = -1 if ndim == 3 else 1
    if not -ndim < axis < ndim or axis in (0, -ndim):
        raise ValueError(
            f"axis={axis} is not a class axis of a {ndim}-D output (axis 0 is the samples)."
        )
    return axis % ndim


def _top1(values: np.ndarray, axis) -> np.ndarray:
    """The argmax along the class axis: shape (n, positions...)."""
    values = np.asarray(values)
    values = values.reshape(len(values), -1) if values.ndim < 2 else values
    return values.argmax(axis=class_axis(values.ndim, axis))


def _positions_kept(mask, shape) -> np.ndarray:
    """Booleans of ``shape`` (n, positions...): False at padding."""
    if mask is None or len(shape) == 1:  # no mask, or one class per sample: every sample
        return np.ones(shape, dtype=bool)
    if mask.shape != tuple(shape):
        raise ValueError(
            f"The batch's attention_mask has shape {mask.shape}, but the output has "
            f"{tuple(shape)} positions: pass axis= to say which axis holds the classes."
        )
    return mask


def _fraction(hits: int, total: int) -> float:
    if total == 0:
        raise ValueError("Cannot score on zero samples (or only padded positions).")
    return hits / total


def _mean_next_token_loss(outputs) -> float:
    """Mean cross-entropy (nats) of each next token over every batch (see :func:`perplexity`)."""
    loss = count = 0.0
    for logits, mask, labels, tokens in zip(outputs.values, outputs.masks, outputs.labels,
                                            outputs.tokens, strict=True):
        if logits.ndim != 3:
            raise ValueError(
                "perplexity needs (n, seq, vocab) logits of a language model; the model "
                f"returned an output of shape {logits.shape}."
            )
        if labels is not None:
            targets, valid = labels[:, 1:], labels[:, 1:] != -100
        elif tokens is not None:
            targets, valid = tokens[:, 1:], np.ones(tokens[:, 1:].shape, dtype=bool)
            if mask is not None:  # a padded token is no target, nor a context to predict from
                valid = mask[:, 1:] & mask[:, :-1]
        else:
            raise ValueError(
                "perplexity needs the token ids: batches that are integer tensors of ids, or "
                "dicts with input_ids (or labels)."
            )
        if targets.shape != logits[:, 1:, 0].shape:
            raise ValueError(
                f"The logits have shape {logits.shape} but the targets {targets.shape[0]}x"
                f"{targets.shape[1] + 1}: one token per position is needed."
            )
        scores = logits[:, :-1].astype(np.float64)
        top = scores.max(axis=-1, keepdims=True)
        log_norm = np.log(np.exp(scores - top).sum(axis=-1)) + top[..., 0]
        picked = np.take_along_axis(scores, np.where(valid, targets, 0)[..., None], -1)[..., 0]
        loss += float((log_norm - picked)[valid].sum())
        count += int(valid.sum())
    if count == 0:
        raise ValueError("Cannot compute a perplexity: no token to predict (sequences of one "
                         "token, or every position padded).")
    return loss / count


def _both_outputs(estimator, X):
    """Per-batch outputs of the compressed and of the original model on ``X``."""
    check_is_fitted(estimator)
    return estimator.outputs(X), estimator.outputs(X, original=True)


def _labels(y) -> np.ndarray:
    """Labels as a NumPy array (accepts torch tensors and lists)."""
    if hasattr(y, "detach"):
        y = y.detach().cpu().numpy()
    return np.asarray(y)


def _ratio(sizes: dict) -> float:
    """``after / before`` of a ``{"before", "after"}`` dict."""
    return float(sizes["after"]) / float(sizes["before"]) if sizes["before"] else 1.0
