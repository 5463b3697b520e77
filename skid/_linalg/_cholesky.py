"""Pivoted Cholesky (LAPACK ``?pstrf``) of a Gram matrix into a :class:`PivotedFactorization`."""

from __future__ import annotations

import math

import numpy as np
from scipy.linalg import blas, lapack

from . import _blocking
from ._blocking import binary_exponent
from ._factorization import PivotedFactorization, ldexp_inf, relative_errors
from ._leading import early_pivot_limit, leading_pivots
from ._threads import small_step


def factorize_gram(
    gram: np.ndarray,
    n_samples: int | None = None,
    product_eps: float | None = None,
    *,
    scale_exp: int = 0,
    upper: bool = False,
    overwrite: bool = False,
    rank: int | None = None,
    tol: float | None = None,
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

    ``rank`` or ``tol``: the caller's width rule, known in advance (a fit for a rank, or for
    an error). Then only the pivots it needs are computed where m > 128
    (:func:`._leading.leading_pivots`): ``rank`` pivots, or up to the first width whose error
    is at most ``tol``, and the result is partial (``complete`` False: the same pivots, rows
    and errors as far as they go, nothing past them). A rule that needs more than
    :func:`._leading.early_pivot_limit` pivots (or more than the rows seen) gets a complete
    factorization: LAPACK finishes the rest's Schur complement, over ``gram``'s memory when it
    may be overwritten; so does one the cutoff ends. Without a rule (a caller that needs the
    whole error curve) it is LAPACK's factorization of the whole Gram, as before.
    """
    gram = np.asarray(gram, dtype=np.float64)
    if not _finite(gram, upper):
        raise ValueError(
            "The statistics hold NaN or infinite values: the data (or the activations) "
            "contain NaN/Inf. Check the input for non-finite values."
        )
    m = gram.shape[0]
    diag_max = float(np.max(np.diagonal(gram), initial=0.0))
    shift = binary_exponent(diag_max) // 2 * 2  # even: U unscales by an exact power of two
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
    if rank is not None or tol is not None:
        fac = _leading(a.T if lower else a, n_samples, cutoff, sq_norm, rank, tol)
        if fac is not None:
            return _unscaled(fac, shift // 2 + scale_exp, product_eps)
    with small_step(m):
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
    errors = relative_errors(sq_tail, sq_norm)
    fac = PivotedFactorization(perm, U, sq_norm, errors, rank, n_samples)
    return _unscaled(fac, shift // 2 + scale_exp, product_eps)


def _unscaled(fac: PivotedFactorization, half: int, product_eps) -> PivotedFactorization:
    """``fac`` of the scaled Gram as the factorization of X itself (``U · 2**half``)."""
    if half:
        np.ldexp(fac.U, half, out=fac.U)
    fac.sq_norm = ldexp_inf(fac.sq_norm, 2 * half)
    fac.float32_products = product_eps is not None
    return fac


def _leading(upper, n_samples, cutoff, sq_norm, rank, tol):
    """:func:`factorize_gram` for a width rule, from the matrix whose upper triangle holds the
    scaled Gram: the leading pivots up to :func:`early_pivot_limit` (partial, or complete where
    the cutoff ends them), then, when the rule needs more, LAPACK for the rest; None where
    LAPACK's whole factorization is the cheaper way (small m)."""
    m = upper.shape[0]
    limit = early_pivot_limit(m)
    if limit == 0:
        return None
    if n_samples is not None:  # LAPACK's pivots past the rows seen: the rest's dpstrf
        limit = min(limit, int(n_samples))
    if cutoff < 0:  # LAPACK's default: m · DLAMCH('Epsilon') · the largest diagonal entry
        cutoff = m * np.finfo(np.float64).epsneg * float(np.max(np.diagonal(upper)))
    with small_step(m):  # its GEMVs, like LAPACK's, on one BLAS thread after the product
        perm, U, row_sq, stop = leading_pivots(
            upper, limit if rank is None else min(rank, limit), cutoff, sq_norm, tol
        )
    k = U.shape[0]
    if stop == "pivots" and (rank is None or k < rank):
        return _continued(upper, perm, U, cutoff, sq_norm, n_samples)
    sq_tail = np.empty(m + 1)
    sq_tail[0] = sq_norm
    sq_tail[1 : k + 1] = sq_norm - np.cumsum(row_sq)
    complete = stop == "cutoff" or k == m
    if complete:
        sq_tail[k + 1 :] = sq_tail[k]
        errors = relative_errors(sq_tail, sq_norm)
    else:  # the curve as far as it goes (the appended 0 is relative_errors' last entry)
        errors = np.full(m + 1, np.nan)
        errors[: k + 1] = relative_errors(np.append(sq_tail[: k + 1], 0.0), sq_norm)[: k + 1]
    return PivotedFactorization(perm, U, sq_norm, errors, k, n_samples, complete=complete)


def _continued(upper, perm, U, cutoff, sq_norm, n_samples) -> PivotedFactorization:
    """The complete factorization after the leading pivots (``U``, ``perm``): LAPACK's
    ``dpstrf`` of the rest's Schur complement, in LAPACK's column order at that point and
    with the whole matrix's cutoff, so that its pivots are the ones it would have chosen.
    Temporaries of 256 rows; the factor is written over ``upper``, which is spent by then."""
    m, k = upper.shape[0], U.shape[0]
    rest = perm[k:]
    schur = _rest_block(upper, rest)
    tail = U[:, k:]
    if k:  # the update of the triangle LAPACK reads, in place (?syrk)
        blas.dsyrk(-1.0, tail, beta=1.0, c=schur.T, trans=1, overwrite_c=1)
    if k == 0 or float(np.max(np.diagonal(schur), initial=0.0)) > cutoff:
        with small_step(m):
            factor, piv, rank, info = lapack.dpstrf(schur.T, tol=cutoff, overwrite_a=True)
        if info < 0:
            raise ValueError(f"LAPACK dpstrf rejected its argument {-info}.")
        order = piv[: m - k].astype(np.int64) - 1
    else:  # LAPACK stops here: its test of the next pivot, which the loop did not reach
        factor, rank, order = None, 0, np.arange(m - k)
    total = k + rank
    trusted = total if n_samples is None else min(total, int(n_samples))
    full = upper.ravel(order="K")[: total * m].reshape(total, m)  # over the spent Gram
    full[:k, :k] = U[:, :k]
    full[:k, k:] = tail[:, order]
    full[k:, :k] = 0.0
    if rank:
        full[k:, k:] = factor[:rank]
        for i in range(1, rank):  # the upper factor (np.triu would make two more copies)
            full[k + i, k : k + i] = 0.0
    full = full[:trusted]
    sq_tail = np.empty(m + 1)
    sq_tail[0] = sq_norm
    sq_tail[1 : trusted + 1] = sq_norm - np.cumsum(np.einsum("ij,ij->i", full, full))
    sq_tail[trusted + 1 :] = sq_tail[trusted]
    perm = np.concatenate([perm[:k], rest[order]])
    return PivotedFactorization(
        perm, full, sq_norm, relative_errors(sq_tail, sq_norm), trusted, n_samples
    )


def _rest_block(upper, rest) -> np.ndarray:
    """``A[rest][:, rest]`` of the symmetric A whose upper triangle ``upper`` holds, its lower
    triangle true (the one LAPACK reads of its transpose): gathered 256 rows at a time from
    the storage's rows (a 2-D fancy index would read across them), then each lower entry whose
    index pair lies in A's lower triangle taken from its mirror, which lies in the upper one."""
    transposed = upper.flags.f_contiguous and not upper.flags.c_contiguous
    rows = upper.T if transposed else upper  # C-ordered: row i of ``rows`` is contiguous
    r, step = rest.shape[0], _blocking.TRIANGLE_STEP
    block = np.empty((r, r))
    for start in range(0, r, step):
        stop = min(start + step, r)
        block[start:stop] = rows[rest[start:stop]][:, rest]
    for start in range(0, r, step):  # writes below the diagonal, reads above it
        stop = min(start + step, r)
        i, j = rest[start:stop, None], rest[None, :stop]
        # (a, b) of the block holds upper[rest_b, rest_a] (transposed) or upper[rest_a, rest_b]
        mirrored = (j > i) if transposed else (i > j)
        below = np.arange(start, stop)[:, None] > np.arange(stop)[None, :]
        np.copyto(block[start:stop, :stop], block[:stop, start:stop].T, where=below & mirrored)
    return block


def _finite(a: np.ndarray, upper: bool = False) -> bool:
    """Whether every entry of the square ``a`` (only its upper triangle with ``upper``) is
    finite: one sum first (finite only if every entry is), then, when it is not, by column
    blocks (masks of m × 256, not m × m)."""
    with _blocking.quiet():
        if math.isfinite(float(np.sum(a))):  # a NaN or Inf anywhere makes the sum non-finite
            return True
    m = a.shape[0]
    for start in range(0, m, _blocking.TRIANGLE_STEP):
        stop = min(start + _blocking.TRIANGLE_STEP, m)
        bad = ~np.isfinite(a[: stop if upper else m, start:stop])
        if (np.triu(bad, -start) if upper else bad).any():  # upper: rows i <= column j
            return False
    return True
