"""Randomized ID: columns from a Gaussian sketch, T from the exact normal equations."""

from __future__ import annotations

import math

import numpy as np
import scipy.linalg

from .. import _array
from ._blocking import _exponent, _non_finite_data, _quiet, _scale_block, row_blocks
from ._threads import _small_step

_ENTRY_SAFE = {"float64": (2.0**-300, 2.0**450), "float32": (2.0**-30, 2.0**50)}


def _data_exponent(X, dtype: str) -> int:
    """0 for data of a safe magnitude for ``dtype``, else the exponent that scales it."""
    amax = _array.max_abs(X)
    if not math.isfinite(amax):
        raise _non_finite_data()
    low, high = _ENTRY_SAFE[dtype]
    return 0 if amax == 0 or low <= amax <= high else _exponent(amax)


def randomized_factorization(X, k: int, rng: np.random.Generator, oversample: int = 10):
    """Columns from a Gaussian sketch, then the exact least-squares T from a second pass.

    Returns ``(selected, T, error)``. The sketch ``Y = Ω X`` ((k + oversample) × m) is pivoted
    by geqp3; T solves ``min ‖X − X[:, J] T‖_F`` through the normal equations
    ``(X_Jᵀ X_J) T = X_Jᵀ X`` accumulated block by block (a T read off the sketch alone is
    about twice as far from X). Two passes, ``O(n m (k + oversample) + n m k)`` work. Data of
    extreme magnitude are scaled block by block by a power of two (nothing changes).
    """
    n, m = X.shape
    dtype = _array.float_dtype_for(X)
    exp = _data_exponent(X, dtype)
    n_sketch = min(k + oversample, n)
    sketch = np.zeros((n_sketch, m))
    for rows in row_blocks(n, m):
        block = _scale_block(_array.astype(X[rows], dtype), exp)
        omega = rng.standard_normal((n_sketch, block.shape[0]), dtype=np.float32)
        with _quiet():
            sketch += _array.to_numpy(_array.from_numpy(omega, block, dtype) @ block)
    if not np.isfinite(sketch).all():
        raise _non_finite_data()
    with _small_step(m):
        _, piv = scipy.linalg.qr(sketch, mode="r", pivoting=True, check_finite=False)
    selected = piv[:k].astype(np.int64)
    cross, sq_norm = _cross_products(X, selected, exp)
    T = _normal_equations(cross, selected)
    sq_err = max(sq_norm - float(np.vdot(cross, T)), 0.0)
    error = math.sqrt(sq_err / sq_norm) if sq_norm > 0 else 0.0
    return selected, T, error


def _cross_products(X, selected, exp=0):
    """``X_Jᵀ X`` (k × m, float64) and ``‖X‖_F²`` in one pass, of ``X / 2**exp``."""
    n, m = X.shape
    cross = None
    sq_norm = 0.0
    for rows in row_blocks(n, m):
        block = _scale_block(_array.astype(X[rows], "float64"), exp)
        part = block[:, _array.from_numpy(selected, block)].T @ block
        cross = part if cross is None else cross + part
        sq_norm += _array.frob_norm(block) ** 2
    return _array.to_numpy(cross), sq_norm


def _normal_equations(cross, selected):
    """Solve ``G_JJ T = X_Jᵀ X`` and make T exactly the identity on the selected columns."""
    gram_jj = cross[:, selected]
    try:
        T = scipy.linalg.solve(gram_jj, cross, assume_a="pos", check_finite=False)
    except (np.linalg.LinAlgError, ValueError):
        T = scipy.linalg.pinvh(gram_jj) @ cross
    T[:, selected] = np.eye(selected.size)
    return T
