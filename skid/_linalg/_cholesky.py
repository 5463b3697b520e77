"""Pivoted Cholesky (LAPACK ``?pstrf``) of a Gram matrix into a :class:`PivotedFactorization`."""

from __future__ import annotations

import math

import numpy as np
from scipy.linalg import lapack

from . import _blocking
from ._blocking import _exponent
from ._factorization import PivotedFactorization, _ldexp_inf, _relative_errors
from ._threads import _small_step


def factorize_gram(
    gram: np.ndarray,
    n_samples: int | None = None,
    product_eps: float | None = None,
    *,
    scale_exp: int = 0,
    upper: bool = False,
    overwrite: bool = False,
) -> PivotedFactorization:
    """Pivoted Cholesky of a Gram matrix ``XᵀX / 4**scale_exp`` (float64, m × m).

    Pivots stop being trusted at the Gram's own rounding: LAPACK's default ``pivot ≤ m · u ·
    max(diag)`` for float64 products (``product_eps=None``), and ``m · product_eps ·
    max(diag)`` for a Gram of float32 products (``product_eps`` their machine epsilon; the
    rounding pivots measured on rank-deficient float32 data stay below ``20 · eps32 ·
    max(diag)``). And never more pivots than ``n_samples``, the rows seen: a
    Gram of n rows has rank at most n, and pivots past that are rounding noise, which would
    give T huge entries. ``U`` and ``sq_norm`` are those of ``X`` itself (``sq_norm`` may be
    infinite for data beyond the float64 range of squares); pivots, T and errors are scale-free.

    Only the upper triangle of ``gram`` is read by LAPACK. With ``upper`` it is the only one
    checked too (the lower one may hold anything). ``overwrite``: ``gram`` is a contiguous
    float64 NumPy array the caller no longer needs; it is scaled and factorized in place and
    ``U`` is a view of it, so no m × m copy is made (otherwise one copy, which LAPACK writes).
    """
    gram = np.asarray(gram, dtype=np.float64)
    if not _finite(gram, upper):
        raise ValueError(
            "The statistics hold NaN or infinite values: the data (or the activations) "
            "contain NaN/Inf. Check the input for non-finite values."
        )
    m = gram.shape[0]
    diag_max = float(np.max(np.diagonal(gram), initial=0.0))
    shift = _exponent(diag_max) // 2 * 2  # even: U unscales by an exact power of two
    if overwrite and gram.flags.f_contiguous:
        a, lower = gram, 0
    elif overwrite and gram.flags.c_contiguous:  # LAPACK's Fortran order reads the transpose:
        a, lower = gram.T, 1  # the same triangle as its lower one
    else:
        a, lower = np.empty_like(gram, order="F"), 0  # the one copy, for LAPACK to overwrite
        if not shift:
            np.copyto(a, gram)
    if shift:
        np.ldexp(gram.T if lower else gram, -shift, out=a)
    sq_norm = float(np.trace(a))
    cutoff = -1.0 if product_eps is None else m * product_eps * math.ldexp(diag_max, -shift)
    with _small_step(m):
        factor, piv, rank, info = lapack.dpstrf(a, lower=lower, tol=cutoff, overwrite_a=True)
    if info < 0:
        raise ValueError(f"LAPACK dpstrf rejected its argument {-info}.")
    if n_samples is not None:
        rank = min(rank, int(n_samples))
    perm = piv[:m].astype(np.int64) - 1
    U = (factor.T if lower else factor)[:rank]
    for i in range(1, rank):  # the upper factor in place (np.triu would copy m × m)
        U[i, :i] = 0.0
    sq_tail = np.empty(m + 1)
    sq_tail[0] = sq_norm
    sq_tail[1 : rank + 1] = sq_norm - np.cumsum(np.einsum("ij,ij->i", U, U))
    sq_tail[rank + 1 :] = sq_tail[rank]
    errors = _relative_errors(sq_tail, sq_norm)
    half = shift // 2 + scale_exp
    if half:
        np.ldexp(U, half, out=U)
    return PivotedFactorization(
        perm, U, _ldexp_inf(sq_norm, 2 * half), errors, rank, n_samples,
        float32_products=product_eps is not None,
    )  # fmt: skip


def _finite(a: np.ndarray, upper: bool = False) -> bool:
    """Whether every entry of the square ``a`` (only its upper triangle with ``upper``) is
    finite, checked by column blocks (masks of m × 256, not m × m)."""
    m = a.shape[0]
    for start in range(0, m, _blocking._TRIANGLE_STEP):
        stop = min(start + _blocking._TRIANGLE_STEP, m)
        bad = ~np.isfinite(a[: stop if upper else m, start:stop])
        if (np.triu(bad, -start) if upper else bad).any():  # upper: rows i <= column j
            return False
    return True
