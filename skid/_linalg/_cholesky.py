"""Pivoted Cholesky (LAPACK ``?pstrf``) of a Gram matrix into a :class:`PivotedFactorization`."""

from __future__ import annotations

import math

import numpy as np
from scipy.linalg import blas

from . import _blocking
from ._blocking import binary_exponent
from ._factorization import PivotedFactorization, ldexp_inf, relative_errors
from ._leading import early_pivot_limit, leading_pivots
from ._nogil import dpstrf
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
    symmetric: bool = False,
    checked: bool = False,
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
    checked too (the lower one may hold anything); ``symmetric``: both triangles hold the
    matrix (the leading pivots then read contiguous lines). ``checked``: the caller knows
    the entries are finite where the diagonal is (a Gram whose every block was checked from
    its diagonal, ``|G_ij| ≤ sqrt(G_ii G_jj)``): only the diagonal is checked. ``overwrite``:
    ``gram`` is a contiguous float64 NumPy array the caller no longer needs; it is scaled and
    factorized in place and ``U`` is a view of it, so no m × m copy is made (otherwise one
    copy, which LAPACK writes, made only when LAPACK runs or the Gram must be scaled).

    A Gram whose largest diagonal entry lies outside ``[2**-SAFE_EXPONENT, 2**SAFE_EXPONENT]``
    is factorized divided by a power of two (exact); within that range every operation of the
    factorization commutes with such a scaling (no value leaves the normal range), so the
    Gram is factorized as it is: the same pivots, T and errors, bit for bit, as scaled.

    ``rank`` or ``tol``: the caller's width rule, known in advance (a fit for a rank, or for
    an error). Then only the pivots it needs are computed where m > 128
    (:func:`._leading.leading_pivots`, which reads ``gram`` in place): ``rank`` pivots, or
    up to the first width whose error is at most ``tol``, and the result is partial
    (``complete`` False: the same pivots, rows and errors as far as they go, nothing past
    them). A rule that needs more than :func:`._leading.early_pivot_limit` pivots (or more
    than the rows seen) gets a complete factorization: LAPACK finishes the rest's Schur
    complement, over ``gram``'s memory when it may be overwritten; so does one the cutoff
    ends. Without a rule (a caller that needs the whole error curve) it is LAPACK's
    factorization of the whole Gram, as before.
    """
    gram = np.asarray(gram, dtype=np.float64)
    diag_max = float(gram.diagonal().max(initial=0.0))  # NaN when the diagonal has one
    if not (math.isfinite(diag_max) if checked else _finite(gram, upper)):
        raise ValueError(
            "The statistics hold NaN or infinite values: the data (or the activations) "
            "contain NaN/Inf. Check the input for non-finite values."
        )
    m = gram.shape[0]
    shift = _shift(diag_max)
    # the upper triangle's holder as the factorization reads it (scaled), and whether LAPACK
    # may write over it; a Gram read in place is copied only when LAPACK runs
    source, writable = (gram, False) if not (shift or overwrite) else (
        _lapack_matrix(gram, shift, overwrite, symmetric), True)
    sq_norm = float(np.trace(source))
    cutoff = -1.0 if product_eps is None else m * product_eps * math.ldexp(diag_max, -shift)
    if rank is not None or tol is not None:
        # LAPACK's default (cutoff -1): m · DLAMCH('Epsilon') · the largest diagonal entry
        stop = cutoff if cutoff >= 0 else m * EPSILON * math.ldexp(diag_max, -shift)
        fac = _leading(source, n_samples, stop, sq_norm, rank, tol, symmetric, writable)
        if fac is not None:
            return _unscaled(fac, shift // 2 + scale_exp, product_eps)
    if not writable:
        source = _lapack_matrix(source, 0, False, symmetric)
    with small_step(m):  # the C-ordered upper triangle: LAPACK's lower one of the transpose
        factor, piv, rank, info = dpstrf(source.T, lower=True, tol=cutoff)
    if info < 0:
        raise ValueError(f"LAPACK dpstrf rejected its argument {-info}.")
    if n_samples is not None:
        rank = min(rank, int(n_samples))
    perm = piv[:m].astype(np.int64) - 1
    U = factor.T[:rank]
    _clear_below_diagonal(U)
    sq_tail = np.empty(m + 1)
    sq_tail[0] = sq_norm
    sq_tail[1 : rank + 1] = sq_norm - np.cumsum(np.einsum("ij,ij->i", U, U))
    sq_tail[rank + 1 :] = sq_tail[rank]
    errors = relative_errors(sq_tail, sq_norm)
    fac = PivotedFactorization(perm, U, sq_norm, errors, rank, n_samples)
    return _unscaled(fac, shift // 2 + scale_exp, product_eps)


def _clear_below_diagonal(U: np.ndarray) -> None:
    """Zeros below the diagonal of ``U`` (k × m, k ≤ m), in place (``np.triu`` would copy it):
    by blocks of rows, a handful of array operations rather than one per row (each of which
    lets another thread take the GIL, and waits to get it back)."""
    step = _blocking.MIRROR_STEP
    for start in range(0, U.shape[0], step):
        rows = U[start : start + step]
        rows[:, :start] = 0.0
        square = rows[:, start : start + rows.shape[0]]
        square[np.tril_indices(rows.shape[0], -1)] = 0.0


EPSILON = float(np.finfo(np.float64).epsneg)  # LAPACK's DLAMCH('Epsilon')

#: A Gram whose largest diagonal entry is within ``2**±SAFE_EXPONENT`` is factorized unscaled.
SAFE_EXPONENT = 900


def _shift(diag_max: float) -> int:
    """The even power of two :func:`factorize_gram` divides the Gram by (0 in the safe range;
    else the one that brings the largest diagonal entry into [2**-2, 1))."""
    if math.ldexp(1.0, -SAFE_EXPONENT) <= diag_max <= math.ldexp(1.0, SAFE_EXPONENT):
        return 0
    return binary_exponent(diag_max) // 2 * 2  # even: U unscales by an exact power of two


def _lapack_matrix(gram, shift: int, overwrite: bool, symmetric: bool = False):
    """``gram / 2**shift`` as a C-ordered array whose upper triangle holds it, in memory
    LAPACK may overwrite: ``gram``'s own (``overwrite``) or one new array.

    ``dpstrf`` reads a C-ordered upper triangle as the lower one of its Fortran-ordered
    transpose, where each step reads and swaps whole columns; given the upper triangle of a
    Fortran-ordered array it walks rows across the columns instead (measured at m = 1,536,
    one OpenBLAS thread: 66 against 113 ms; 8 against 16 ms at 768). A Fortran-ordered
    ``gram`` that may be overwritten is its C-ordered transpose where ``symmetric``, and is
    made symmetric in place otherwise (its upper triangle mirrored: no m × m copy)."""
    if overwrite and (gram.flags.c_contiguous or gram.flags.f_contiguous):
        if gram.flags.c_contiguous:
            a = gram
        else:
            if not symmetric:
                mirror_upper(gram)
            a = gram.T  # the same symmetric matrix, C-ordered
        if shift:
            np.ldexp(a, -shift, out=a)
        return a
    a = np.empty(gram.shape)  # the one copy, for LAPACK to overwrite
    if shift:
        np.ldexp(gram, -shift, out=a)
    else:
        _copy_to_c(a, gram.T if symmetric and gram.flags.f_contiguous else gram)
    return a


def mirror_upper(a: np.ndarray) -> np.ndarray:
    """``a``'s upper triangle copied over its lower one, in place, in square blocks (a
    transpose across a whole m × m array reads a cache line per entry)."""
    m, step = a.shape[0], _blocking.MIRROR_STEP
    for start in range(0, m, step):
        stop = min(start + step, m)
        a[stop:, start:stop] = a[start:stop, stop:].T
        square = a[start:stop, start:stop]
        below = np.tril_indices(stop - start, -1)
        square[below] = square.T[below]
    return a


def _copy_to_c(target: np.ndarray, source: np.ndarray) -> None:
    """``target[...] = source`` for a C-ordered ``target``, in column blocks where ``source``
    is laid out otherwise (NumPy's one strided copy of a Fortran-ordered m × m array is
    ≈ 1.6× slower)."""
    if source.flags.c_contiguous:
        np.copyto(target, source)
        return
    step = _blocking.MIRROR_STEP
    for start in range(0, source.shape[1], step):
        target[:, start : start + step] = source[:, start : start + step]


def _unscaled(fac: PivotedFactorization, half: int, product_eps) -> PivotedFactorization:
    """``fac`` of the scaled Gram as the factorization of X itself (``U · 2**half``)."""
    if half:
        np.ldexp(fac.U, half, out=fac.U)
    fac.sq_norm = ldexp_inf(fac.sq_norm, 2 * half)
    fac.float32_products = product_eps is not None
    return fac


def _leading(upper, n_samples, cutoff, sq_norm, rank, tol, symmetric, writable):
    """:func:`factorize_gram` for a width rule, from the matrix whose upper triangle holds the
    scaled Gram (``symmetric``: both triangles; ``writable``: LAPACK may write over it, else
    it is copied first) and LAPACK's ``cutoff`` (its value, not its default -1): the leading
    pivots up to :func:`early_pivot_limit` (partial, or complete where the cutoff ends them),
    then, when the rule needs more, LAPACK for the rest; None where LAPACK's whole
    factorization is the cheaper way (small m)."""
    m = upper.shape[0]
    limit = early_pivot_limit(m)
    if limit == 0:
        return None
    if n_samples is not None:  # LAPACK's pivots past the rows seen: the rest's dpstrf
        limit = min(limit, int(n_samples))
    with small_step(m):  # its GEMVs, like LAPACK's, on one BLAS thread after the product
        perm, U, row_sq, stop = leading_pivots(
            upper, limit if rank is None else min(rank, limit), cutoff, sq_norm, tol,
            symmetric=symmetric,
        )
    k = U.shape[0]
    if stop == "pivots" and (rank is None or k < rank):
        if not writable:
            upper = _lapack_matrix(upper, 0, False)
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
            factor, piv, rank, info = dpstrf(schur.T, lower=False, tol=cutoff)
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
        _clear_below_diagonal(full[k:, k:])  # the upper factor (np.triu would copy twice)
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
    """Whether every entry of ``a`` (of a square ``a``, only its upper triangle with
    ``upper``) is finite: one sum first (finite only if every entry is), then, when it is
    not, by column blocks (masks of m × 256, not m × m)."""
    with _blocking.quiet():
        if math.isfinite(float(np.sum(a))):  # a NaN or Inf anywhere makes the sum non-finite
            return True
    if a.ndim == 1:
        return False
    m = a.shape[0]
    for start in range(0, m, _blocking.TRIANGLE_STEP):
        stop = min(start + _blocking.TRIANGLE_STEP, m)
        bad = ~np.isfinite(a[: stop if upper else m, start:stop])
        if (np.triu(bad, -start) if upper else bad).any():  # upper: rows i <= column j
            return False
    return True
