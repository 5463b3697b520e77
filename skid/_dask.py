"""Dask arrays for the ID: the m × m statistic as a tree reduction over row chunks.

Each row chunk is turned into its own accumulator (a Gram matrix or an R factor) by a task on
the array's scheduler — a ``dask.distributed`` cluster when a client is active — and the
partial statistics are merged pairwise up a tree, so no worker ever holds more than a chunk of
``X`` plus a few m × m statistics, and only the final statistic comes back to this process.
Imported only when a Dask array arrives (``import skid`` never imports Dask).
"""

from __future__ import annotations

import copy

import dask
import numpy as np

#: Partial statistics merged per task of the reduction tree.
_FAN_IN = 8


def accumulate(X, template, *, check_finite: bool):
    """``template`` (an empty accumulator) fed with every row of the Dask array ``X``.

    Parameters
    ----------
    X : dask.array.Array of shape (n_samples, n_features)
        Column chunks are joined (per row chunk, lazily); row chunks are reduced in parallel.
    template : GramAccumulator or QRAccumulator
        Empty accumulator, copied for every chunk (it carries the settings, e.g. precision).
    check_finite : bool
        Raise on NaN/inf in a chunk, in the task that reads it (``partial_fit``: not to poison
        the statistics already accumulated).

    Returns
    -------
    accumulator : the template's type, holding the statistic of all rows (host NumPy).
    """
    chunks = X.rechunk({1: -1}).to_delayed().ravel().tolist()
    parts = [dask.delayed(_chunk_statistic)(c, template, check_finite) for c in chunks]
    while len(parts) > 1:
        parts = [
            dask.delayed(_merge)(*parts[i : i + _FAN_IN]) for i in range(0, len(parts), _FAN_IN)
        ]
    (result,) = dask.compute(parts[0])
    return result


def _chunk_statistic(block, template, check_finite: bool):
    """The statistic of one row chunk (an empty copy of ``template`` for a chunk of 0 rows)."""
    accumulator = copy.deepcopy(template)
    block = np.asarray(block)
    if check_finite and not np.isfinite(block).all():
        raise ValueError("Input X contains NaN or infinity; remove or impute those entries.")
    if block.shape[0] == 0:
        return accumulator
    return accumulator.update(block)


def _merge(first, *others):
    """One accumulator holding the rows of all of them."""
    for other in others:
        first = first.merge(other)
    return first


def check_shape(X) -> None:
    """A clear error for Dask arrays whose chunk sizes are unknown (e.g. after a boolean mask)."""
    if any(np.isnan(size) for size in X.shape):
        raise ValueError(
            f"The Dask array has unknown chunk sizes (shape {X.shape}); call "
            "X.compute_chunk_sizes() (or X = X.persist()) before fitting."
        )


def frob_norm(X) -> float:
    """Frobenius norm of a Dask array, computed on its scheduler in float64."""
    import dask.array as da

    return float(da.sqrt((X.astype("float64") ** 2).sum()).compute())
