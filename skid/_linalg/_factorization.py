"""The result every route gives: a column-pivoted triangular factor, its error curve and T."""

from __future__ import annotations

import math

import numpy as np
import scipy.linalg

from .. import _policy
from ._nogil import dtrsm
from ._threads import small_step


class PivotedFactorization:
    """A column-pivoted upper-trapezoidal factor ``U`` of a data matrix, and what follows.

    Parameters
    ----------
    perm : ndarray of shape (m,)
        Column pivot order.
    U : ndarray of shape (p, m)
        Pivoted factor, columns in ``perm`` order; only its first ``trusted_rank`` rows are
        used for solves.
    sq_norm : float
        ``‖X‖_F²`` (infinite when it exceeds the float64 range; ``errors`` are computed on
        scaled data and stay exact).
    errors : ndarray of shape (m + 1,)
        Relative Frobenius ID error keeping the first k pivots, k = 0..m.
    trusted_rank : int
        Rows of ``U`` whose diagonal is clear of the statistic's rounding, and at most the
        number of rows seen (solves use no more).
    n_samples : int or None
        Rows of X the statistic was accumulated from (None: unknown).
    float32_products : bool
        Whether the statistic is a Gram of float32 products (its rounding is float32's).
    complete : bool
        False for the leading pivots of a width rule only (``factorize_gram(rank=, tol=)``):
        ``U`` has ``trusted_rank`` rows, ``errors`` is NaN past them, and what needs more
        (a wider selection, the Gram, the numerical rank) raises.
    """

    def __init__(
        self, perm, U, sq_norm, errors, trusted_rank, n_samples=None, float32_products=False,
        complete=True,
    ):  # fmt: skip
        self.perm = perm
        self.U = U
        self.sq_norm = sq_norm
        self.errors = errors
        self.trusted_rank = trusted_rank
        self.n_samples = n_samples
        self.float32_products = float32_products
        self.complete = complete

    @property
    def n_features(self) -> int:
        return self.perm.shape[0]

    def rank_for_tol(self, tol: float) -> int:
        """Smallest k ≥ 1 whose relative error is at most ``tol`` (the policy's rule)."""
        return self._within(_policy.width_for_tol(self.errors, tol))

    def _within(self, k: int) -> int:
        """``k``, checked against the pivots of a partial factorization."""
        if not self.complete and k > self.trusted_rank:
            raise ValueError(f"This factorization stopped after {self.trusted_rank} pivots "
                             f"(its caller's width rule); width {k} needs a complete one.")
        return k

    def numerical_rank(self, rel_tol: float) -> int:
        """Number of pivots with ``|U_kk| > rel_tol · |U_00|`` (at least 1)."""
        self._within(self.n_features)
        diag = np.abs(np.diag(self.U[: self.trusted_rank]))
        if diag.size == 0 or diag[0] == 0:
            return 1
        return max(1, int(np.count_nonzero(diag > rel_tol * diag[0])))

    def gram(self) -> np.ndarray:
        """The Gram ``XᵀX`` (m × m, original column order) as the factor holds it (``UᵀU``)."""
        self._within(self.n_features)
        U = self.U[: self.trusted_rank]
        gram = np.empty((self.n_features, self.n_features))
        gram[np.ix_(self.perm, self.perm)] = U.T @ U
        return gram

    def select(self, k: int):
        """Selected columns (pivot order) and the interpolation matrix T of shape (k, m).

        Pivots past ``trusted_rank`` are kept as themselves (identity rows of T) and take no
        part in reconstructing the other columns.
        """
        m = self.n_features
        k_solve = min(self._within(k), self.trusted_rank)
        T = np.zeros((k, m))  # written in the original column order: no pivoted copy
        T[np.arange(k), self.perm[:k]] = 1.0
        if k_solve > 0 and k < m:
            with small_step(m):
                T[:k_solve, self.perm[k:]] = _interpolation(self.U, k_solve, k)
        return self.perm[:k].copy(), T


def _interpolation(U: np.ndarray, rows: int, k: int) -> np.ndarray:
    """``U[:rows, :rows]⁻¹ U[:rows, k:]``, the triangle read where it is: a row-major ``U``
    (the Cholesky routes' factor) is the column-major lower triangle ``Uᵀ``, and ``Xᵀ =
    U[:rows, k:]ᵀ U[:rows, :rows]⁻ᵀ`` is solved from the right in a row-major copy of the
    right-hand sides — no copy of the triangle (``solve_triangular`` makes Fortran copies of
    both). A column-major ``U`` (QR's ``R``) is solved from the left; any other layout, or a
    zero on the diagonal (singular), goes to SciPy."""
    triangle = U[:rows, :rows]
    if np.all(np.diagonal(triangle) != 0) and U.dtype == np.float64:
        if U.strides[1] == U.itemsize:
            X = np.array(U[:rows, k:], order="C")
            dtrsm(triangle.T, X.T, right=True, lower=True)
            return X
        if U.strides[0] == U.itemsize:
            return dtrsm(triangle, np.array(U[:rows, k:], order="F"), right=False,
                         lower=False)
    return scipy.linalg.solve_triangular(triangle, U[:rows, k:], check_finite=False)


def relative_errors(sq_tail: np.ndarray, sq_norm: float) -> np.ndarray:
    """Relative errors from the squared tail norms, made nonincreasing and ending at 0."""
    sq_tail = np.minimum.accumulate(np.maximum(sq_tail, 0.0))
    sq_tail[-1] = 0.0
    if sq_norm <= 0:
        return np.zeros_like(sq_tail)
    return np.sqrt(sq_tail / sq_norm)


def ldexp_inf(value: float, exp: int) -> float:
    """``value * 2**exp``, infinite past the float64 range."""
    try:
        return math.ldexp(value, exp)
    except OverflowError:
        return math.inf
