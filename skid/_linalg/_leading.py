"""The leading pivots of a pivoted Cholesky, stopped once a fit's width is known.

LAPACK's ``?pstrf`` runs all m pivots, however few the fit keeps; at m = 256 it costs about
three ``?potrf`` (its inner panel is level-2), while a ``rank=64`` fit needs only the first 64
rows of its factor. :func:`leading_pivots` computes those rows and stops: after a number of
pivots, or once the error tail ``‖R22‖_F²`` is at most ``tol² ‖X‖_F²``. Its pivots are
``?pstf2``'s: the largest remaining diagonal ``A_ii − Σ_k U_ki²``, the first in the current
pivot order on ties, and the same stopping rule at the cutoff; so it selects the columns
LAPACK would, up to the rounding of near-ties.

The rows are computed in the matrix's own column order (each one GEMV against the rows before
it; no row or column swaps, no symmetric copy) and gathered into pivot order at the end.
Each pivot costs a few NumPy calls (≈ 6 µs at m = 256) plus a GEMV that grows with the pivots,
so it pays off for the leading pivots only (:func:`early_pivot_limit`, measured per m with
``benchmarks/bench_id.py --pivots``).
"""

from __future__ import annotations

import math

import numpy as np

#: Up to this m the whole ``?pstrf`` is cheaper than a loop of NumPy calls.
_SMALL_M = 128


def early_pivot_limit(m: int) -> int:
    """Most pivots :func:`leading_pivots` computes for an m × m Gram (0: LAPACK's whole
    factorization is cheaper); past them LAPACK factorizes the rest. Measured against
    ``dpstrf`` (``bench_id.py --pivots``, OpenBLAS, one thread): the first m/4 pivots cost
    0.16–0.39× its time from m = 256 to 2,048, m/2 pivots 0.4–0.8× (the loop's GEMVs grow as
    k² m), while after m/4 pivots LAPACK on the remaining 3m/4 costs about (3/4)³ of it."""
    return 0 if m <= _SMALL_M else m // 4


def leading_pivots(
    upper, max_pivots: int, cutoff: float, sq_norm: float, tol: float | None = None, *,
    symmetric: bool = False,
):  # fmt: skip
    """The first pivots and rows of the pivoted Cholesky factor of a symmetric PSD matrix.

    Parameters
    ----------
    upper : ndarray of shape (m, m)
        Float64 matrix whose upper triangle holds the symmetric one (the lower one is not
        read unless ``symmetric``); only read. Each pivot reads one row of it, from its
        column above the diagonal and its row from the diagonal on.
    max_pivots : int
        Stop after this many pivots.
    cutoff : float
        LAPACK's stop: a pivot (after the first) at most ``cutoff``, or a first pivot ≤ 0,
        ends the factorization there (``?pstrf``'s ``DSTOP``).
    sq_norm : float
        The trace of the matrix as the caller computed it (the errors' denominator).
    tol : float or None
        Also stop at the first width whose relative error is at most ``tol``: the error
        computed as :func:`~._factorization.relative_errors` does from the rows' squared
        norms (the same operations, so that ``width_for_tol`` of those errors is this width).
    symmetric : bool
        Both triangles hold the matrix: each pivot reads its row as one contiguous line (a
        row of a C-ordered ``upper``, a column of an F-ordered one) instead of a column and
        a strided row (the same values, fewer cache lines).

    Returns
    -------
    perm : ndarray of shape (m,)
        Pivot order: the first ``k`` pivots, then the other columns in LAPACK's order at
        that point.
    U : ndarray of shape (k, m)
        The factor's first k rows, columns in pivot order (upper trapezoidal).
    row_sq : ndarray of shape (k,)
        Squared norms of U's rows.
    stop : {"cutoff", "tol", "pivots"}
        What stopped it: the cutoff (then the factorization is complete: LAPACK stops there
        too; so is one that reached all m pivots), the error rule, or ``max_pivots``.
    """
    m = upper.shape[0]
    lines = upper if upper.flags.c_contiguous else upper.T  # line p: row p = column p
    rows = np.empty((max_pivots, m))  # in the matrix's column order
    row_sq = np.empty(max_pivots)
    perm, where = list(range(m)), list(range(m))  # pivot order, and each column's place in it
    alive = np.ones(m)  # 0 at the pivots taken: their entries of a new row are rounding
    residual = upper.diagonal().copy()  # A_ii − Σ_k U_ki²; −inf at the pivots taken
    backward = residual[::-1]
    sq, done, tail, k, stop = np.empty(m), 0.0, math.inf, 0, "pivots"
    while k < max_pivots:
        p = int(residual.argmax())
        if p != m - 1 - int(backward.argmax()):  # a tie: the first in pivot order (MAXLOC)
            p = perm[k + int(residual.take(perm[k:]).argmax())]
        pivot = float(residual[p])
        if not pivot > (cutoff if k else 0.0):  # NaN stops too
            stop = "cutoff"
            break
        q = where[p]  # LAPACK's swap of columns k and q
        perm[q], where[perm[k]] = perm[k], q
        perm[k], where[p] = p, k
        pivot = math.sqrt(pivot)
        row = rows[k]
        if k:
            np.dot(rows[:k, p], rows[:k], out=sq)  # BLAS's GEMV, as matmul's: less overhead
            if symmetric:
                np.subtract(lines[p], sq, out=row)
            else:
                row[:p] = upper[:p, p]
                row[p:] = upper[p, p:]
                row -= sq
        elif symmetric:
            row[:] = lines[p]
        else:
            row[:p] = upper[:p, p]
            row[p:] = upper[p, p:]
        row *= alive
        row *= 1.0 / pivot
        row[p] = pivot
        alive[p] = 0.0
        np.multiply(row, row, out=sq)
        residual -= sq
        residual[p] = -math.inf
        k += 1
        if tol is not None:  # relative_errors and width_for_tol, one width at a time
            row_sq[k - 1] = value = float(sq.sum())
            done += value  # np.cumsum's sequential sum
            tail = min(tail, max(sq_norm - done, 0.0))
            if k == m or sq_norm <= 0 or math.sqrt(tail / sq_norm) <= tol:
                stop = "tol"
                break
    perm = np.array(perm)
    U = rows[:k][:, perm]
    if tol is None:
        row_sq[:k] = np.einsum("ij,ij->i", U, U)
    return perm, U, row_sq[:k], stop
