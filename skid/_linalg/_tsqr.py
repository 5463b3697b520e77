"""Tall-skinny QR: the R factor streamed block by block, then column-pivoted QR (``?geqp3``)."""

from __future__ import annotations

import math

import numpy as np
import scipy.linalg

from .. import _array
from ._blocking import (
    binary_exponent,
    check_block,
    non_finite_data,
    quiet,
    row_blocks,
    scale_block,
)
from ._factorization import PivotedFactorization, ldexp_inf, relative_errors
from ._threads import small_step


def factorize_triangular(
    R: np.ndarray, dtype_eps: float, n_samples: int | None = None, *, scale_exp: int = 0
) -> PivotedFactorization:
    """Column-pivoted QR (geqp3) of a triangular factor ``R / 2**scale_exp`` (p × m) of X.

    R is scaled by a power of two first, so data of any finite magnitude give finite errors.
    """
    R = np.asarray(R, dtype=np.float64)
    if not np.isfinite(R).all():
        raise ValueError("The data contain NaN or infinite values; remove or impute them.")
    p, m = R.shape
    shift = binary_exponent(float(np.max(np.abs(R), initial=0.0)))
    if shift:
        R = np.ldexp(R, -shift)
    with small_step(m):
        U, perm = scipy.linalg.qr(R, mode="r", pivoting=True, check_finite=False)
    U = U[: min(p, m)]
    row_sq = np.einsum("ij,ij->i", U, U)
    sq_norm = float(row_sq.sum())
    sq_tail = np.zeros(m + 1)
    sq_tail[: row_sq.size] = np.cumsum(row_sq[::-1])[::-1]
    diag = np.abs(np.diag(U))
    cutoff = diag[0] * max(p, m) * dtype_eps if diag.size else 0.0
    trusted = int(np.count_nonzero(diag > cutoff)) if diag.size and diag[0] > 0 else 0
    if n_samples is not None:
        trusted = min(trusted, int(n_samples))
    errors = relative_errors(sq_tail, sq_norm)
    shift += scale_exp
    return PivotedFactorization(
        perm.astype(np.int64), np.ldexp(U, shift), ldexp_inf(sq_norm, 2 * shift), errors,
        trusted, n_samples,
    )  # fmt: skip


class QRAccumulator:
    """Streams row blocks of X into the R factor of a tall-skinny QR, in the data's dtype.

    A block is folded in only when the new R is finite: a block with NaN/Inf raises and
    leaves R as it was; a block too large for its dtype is divided by a power of two first
    (R is kept as ``R / 2**scale_exp``).
    """

    def __init__(self):
        self.R = None
        self.n_samples = 0
        self.n_features = None
        self.dtype = None
        self.scale_exp = 0

    def update(self, X) -> QRAccumulator:
        """Fold the rows of the 2-D array ``X`` into R (at most m × m)."""
        X = check_block(X, self.n_features)
        dtype = self.dtype or _array.float_dtype_for(X)
        for rows in row_blocks(X.shape[0], X.shape[1]):
            block = _array.astype(X[rows], dtype)
            R = _folded(self.R, scale_block(block, self.scale_exp))
            if R is None:  # overflow, or NaN/Inf in the block
                amax = _array.max_abs(block)
                if not math.isfinite(amax):
                    raise non_finite_data()
                exp = max(binary_exponent(amax), self.scale_exp)
                previous = None if self.R is None else scale_block(self.R, exp - self.scale_exp)
                R = _folded(previous, scale_block(block, exp))
                if R is None:
                    raise non_finite_data()
                self.scale_exp = exp
            self.R = R
        if self.n_features is None:
            self.n_features, self.dtype = X.shape[1], dtype
        self.n_samples += X.shape[0]
        return self

    def merge(self, other: QRAccumulator) -> QRAccumulator:
        """Fold in the rows accumulated by ``other``: R of its R stacked under ours."""
        if other.R is None:
            return self
        check_block(other.R, self.n_features)
        if self.R is None:
            self.n_features, self.dtype = other.n_features, other.dtype
            self.R, self.scale_exp = other.R, other.scale_exp
        else:
            exp = max(self.scale_exp, other.scale_exp)  # both R's at the larger scale
            ours = scale_block(self.R, exp - self.scale_exp)
            theirs = scale_block(other.R, exp - other.scale_exp)
            self.R = _array.qr_r(_array.vstack([ours, theirs], like=ours))
            self.scale_exp = exp
        self.n_samples += other.n_samples
        return self

    def factorize(self, consume: bool = False, *, rank=None, tol=None) -> PivotedFactorization:
        """Column-pivoted QR of the accumulated R factor (on the host).

        Parameters
        ----------
        consume : bool
            As in :meth:`GramAccumulator.factorize`, the accumulator is left empty (R, which
            merges may share, is still copied).
        rank, tol : optional
            Accepted as by :meth:`GramAccumulator.factorize`; the factorization is complete.

        Returns
        -------
        PivotedFactorization
        """
        if self.R is None:
            raise ValueError("No data has been accumulated yet.")
        eps = float(np.finfo(self.dtype).eps)
        try:
            return factorize_triangular(
                _array.to_numpy(self.R), eps, self.n_samples, scale_exp=self.scale_exp
            )
        finally:
            if consume:
                self.__init__()


def _folded(R, block):
    """The R factor of ``[R; block]``, or None when it is not finite."""
    stacked = block if R is None else _array.vstack([R, block], like=block)
    with quiet():
        new_R = _array.qr_r(stacked)
    return new_R if math.isfinite(_array.max_abs(new_R)) else None
