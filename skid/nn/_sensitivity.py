"""What one unit's ID error does to the model's output, measured on a calibration batch.

``target_flops`` trades every unit's error against every other's. A unit's relative error
``e_i`` is its own currency: the same ``e`` in the first MLP of a language model and in its
last changes the logits by very different amounts. The exchange rate is measured: each unit
alone is cut to the width of the plain uniform cut (the same fraction everywhere), with its
ID and fold, and ``w_i = ‖y − y_i‖² / e_i²`` is the squared change of the outputs ``y`` on
one calibration batch per squared relative error. The budget's greedy then spends FLOPs where
``Σ w_i e_i(k_i)²`` grows least (:func:`skid.nn._budget.flops_candidates`).

Cost: one forward pass of one batch per unit, each on a :func:`sharing_copy` of the model
holding one unit's folded weights. The candidates are then judged on calibration rows that
neither the weights nor the fitted ``T`` saw (:func:`split_held_out`: the first batch is held
out of a second statistics pass, whose folds the candidates are built with): judged on rows
the fold was fitted to, a deep cut of one unit looks better than it generalizes. The first
batch, not another, because it is the one batch the ranks of a data-parallel fit agree on, so
ranks on shards hold out what one process on all the data holds out.

The judge counts two things (:func:`output_gap`): the outputs' distance and, per sample, the
angle between their output and the original's. A narrow cut's fold shrinks the outputs (a
least-squares fit loses norm) and the distance counts that shrinkage as error, though it moves
no sample's top class; a candidate may then win on distance while turning more samples'
outputs away from the original's (on the digits CNN: closer logits, fewer agreeing digits). So
a candidate replaces the plain uniform cut only where it is at least as close in both
(:func:`most_faithful`): the uniform cut's guarantee holds in each.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from . import _distributed
from ._outputs import batch_outputs
from ._surgery import sharing_copy

__all__ = ["held_out_batch", "measured", "most_faithful", "output_gap", "output_weights",
           "split_held_out"]


def output_weights(work, units, facs, widths, batch, fold, outputs, distance) -> np.ndarray:
    """``w_i``: squared output change per squared relative error when unit ``i`` alone keeps
    ``widths[i]``, on ``batch``.

    Units kept whole there, or whose error is 0 at that width, say nothing about their rate:
    they get the median of the others (1 when no unit says anything).

    Parameters
    ----------
    work : nn.Module
        The model (not modified: every trial is a sharing copy).
    units, facs : lists
        The units and their factorizations (with ``errors`` and ``select``).
    widths : array of int
        Width per unit (valid head counts for heads).
    batch
        One calibration batch.
    fold : callable
        ``fold(model, unit, fac, k)`` folds unit's selection at width ``k`` into ``model``.
    outputs, distance : callable
        ``outputs(model, batch)`` and ``distance(model, reference, batch)``
        (:mod:`skid.nn._outputs`).
    """
    reference = outputs(work, batch)
    weights = np.full(len(units), np.nan)
    for i, (unit, fac, k) in enumerate(zip(units, facs, widths, strict=True)):
        error = float(fac.errors[int(k)])
        if int(k) >= len(fac.errors) - 1 or error <= 0:  # kept whole, or exact
            continue
        trial = sharing_copy(work)
        fold(trial, unit, fac, int(k))
        weights[i] = distance(trial, reference, batch) ** 2 / error**2
    return measured(weights)


def split_held_out(batches):
    """``(rest, held)``: the calibration data without its first batch, and that batch, for
    judging candidates on rows their statistics never saw; None (on every rank alike) when the
    data cannot be split so (one batch in all, a one-shot iterator, an iterable that is not a
    list).

    Data-parallel, the first batch is the rank-agreed one (:func:`_distributed.first_batch`):
    the rank it comes from leaves it out of its statistics, the others keep all their rows, so
    together they leave out what one process on all the data leaves out. ``rest.first``, which
    measures the output weights, is agreed the same way (the data's second batch when the
    shards are contiguous and the first holds two batches).
    """
    if not batches.rereadable:
        return None
    owner = _distributed.owns_first_batch(batches.n_batches != 0)
    # a copy, not the fit's own Batches: rest.first is agreed below, batches.first must stay
    split = batches.split_first() if owner else (copy.copy(batches), batches.first)
    unsplittable, any_rest = _distributed.any_rank(
        split is None, split is not None and split[0].n_batches != 0)
    if unsplittable or not any_rest:
        return None
    rest, held = split
    rest.first = _distributed.first_batch(rest.first)
    return rest, held


def held_out_batch(batches):
    """The calibration batch that judges the ``target_flops`` candidates where the data does
    not split: the second batch when there is one (the first measured the weights), else the
    first; data-parallel, the second batch of the rank the first comes from, the same on every
    rank."""
    if not batches.rereadable:
        return batches.first
    if _distributed.current() is None:
        return batches.second()
    owner = _distributed.owns_first_batch(batches.n_batches != 0)
    return _distributed.first_batch(batches.second() if owner else None)


def measured(weights) -> np.ndarray:
    """Units without a measured weight get the median of the others (1 if none)."""
    known = weights[np.isfinite(weights)]
    return np.where(np.isfinite(weights), weights, float(np.median(known)) if known.size else 1.0)


def output_gap(model, reference, batch) -> tuple[float, float]:
    """How far ``model``'s outputs on ``batch`` are from ``reference``: their Frobenius
    distance, and the sum over samples of ``1 − cos`` of each sample's output (flattened) and
    its reference (two zero outputs are the same direction, one zero output is orthogonal)."""
    outputs = batch_outputs(model, batch)
    distance = float(torch.linalg.vector_norm(outputs - reference))
    ours, theirs = outputs.reshape(len(outputs), -1), reference.reshape(len(reference), -1)
    norms = torch.linalg.vector_norm(ours, dim=1) * torch.linalg.vector_norm(theirs, dim=1)
    cosine = (ours * theirs).sum(1) / torch.where(norms > 0, norms, 1.0)
    same = (norms == 0) & (ours == theirs).all(1)
    return distance, float((1.0 - torch.where(same, 1.0, cosine)).sum())


def most_faithful(gaps, plain: int | None) -> int:
    """The index of the candidate to keep, from each one's :func:`output_gap`: the closest in
    distance among those at least as close as the plain uniform cut ``gaps[plain]`` in
    distance *and* in direction (the plain cut itself qualifies); the closest in distance
    where there is no plain cut (None). Ties go to the earlier candidate."""
    if plain is None:
        allowed = range(len(gaps))
    else:
        allowed = [i for i, (distance, angle) in enumerate(gaps)
                   if distance <= gaps[plain][0] and angle <= gaps[plain][1]]
    return min(allowed, key=lambda i: gaps[i][0])
