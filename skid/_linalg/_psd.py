"""Products with the pseudo-inverse of a small symmetric positive semi-definite block (a
head's Gram), from its Cholesky factor wherever that gives the eigendecomposition's result.

The head greedy and its least-squares folds solve with a few hundred 16- to 64-wide Gram
blocks per fit, and the eigendecomposition of such a block costs 17–25 times its Cholesky
factorization (`benchmarks/README.md`). The pseudo-inverse drops the eigenvalues at or below a
cutoff; where every eigenvalue is above it, it is the inverse, and a Cholesky factor gives the
same products, to rounding. That is known without the eigenvalues: the factorization of
``A − τI`` in floating point succeeds only if ``λ_min(A) > τ − ‖E‖₂``, its backward error
bounded by ``(n + 1)² eps tr(A)`` (Higham, *Accuracy and Stability*, Thm. 10.3, with
``‖A‖₂ ≤ tr(A)``), so with ``τ`` the cutoff plus twice that bound its success proves that no
eigenvalue would be dropped. Otherwise (linearly dependent columns, or close to them) the
eigendecomposition decides, as it always did.
"""

from __future__ import annotations

import numpy as np
from scipy.linalg import lapack

__all__ = ["inverse_root_product", "least_squares_fold", "pinvh_solve"]

_EPS = float(np.finfo(np.float64).eps)


def definite_factor(A: np.ndarray, cutoff: float) -> np.ndarray | None:
    """The lower Cholesky factor of the symmetric ``A`` if every eigenvalue of ``A`` is provably
    above ``cutoff`` (see the module), else None."""
    n = A.shape[0]
    trace = float(A.trace())
    if n == 0 or not trace > 0:
        return None
    margin = cutoff + 2.0 * (n + 1) ** 2 * _EPS * trace
    shifted = A.copy()  # LAPACK's to overwrite
    shifted.flat[:: n + 1] -= margin  # the diagonal only (A - margin·I, entry for entry)
    _, info = lapack.dpotrf(shifted, lower=1, clean=0, overwrite_a=1)
    if info:
        return None
    factor, info = lapack.dpotrf(A, lower=1, clean=1)
    return factor if info == 0 else None


def inverse_root_product(A: np.ndarray, B: np.ndarray, cutoff: float) -> np.ndarray:
    """``H`` with ``HᵀH = Bᵀ A⁺ B``, ``A⁺`` the pseudo-inverse of the PSD ``A`` without its
    eigenvalues at or below ``cutoff``: ``L⁻¹B`` from ``A``'s Cholesky factor, or
    ``Λ^(-1/2) Vᵀ B`` over the kept eigenpairs."""
    factor = definite_factor(A, cutoff)
    if factor is not None:
        H, info = lapack.dtrtrs(factor, B, lower=1)
        if info == 0:
            return H
    w, V = np.linalg.eigh(A)
    keep = w > cutoff
    return (V[:, keep] / np.sqrt(w[keep])).T @ B


def pinvh_solve(A, B):
    """``scipy.linalg.pinvh(A) @ B`` for a symmetric ``A``: the eigenvalues above
    ``len(A) · eps · max|λ|`` inverted, the others dropped (the minimum-norm solution), as
    pinvh does, but from LAPACK's divide-and-conquer ``syevd`` instead of pinvh's
    QR-iteration ``syev`` (the same result to rounding, three times faster at 384 × 384), and
    from a Cholesky factor where no eigenvalue would be dropped (a PSD ``A`` whose eigenvalues
    are provably above ``len(A) · eps · tr(A) ≥`` the cutoff: see the module)."""
    factor = definite_factor(A, len(A) * _EPS * float(A.trace()))
    if factor is not None:
        X, info = lapack.dpotrs(factor, B, lower=1)
        if info == 0:
            return X
    s, u = np.linalg.eigh(A)
    above = np.abs(s) > len(A) * _EPS * np.max(np.abs(s), initial=0.0)
    u = u[:, above]
    return ((u / s[above]) @ u.T) @ B


def least_squares_fold(gram, columns) -> np.ndarray:
    """``T`` minimizing ``‖X − X[:, columns] T‖_F``, from ``G = XᵀX`` alone: ``G_KK⁺ G_K:``
    (the minimum-norm one where the kept columns are linearly dependent)."""
    rows = gram[columns]
    return pinvh_solve(rows[:, columns], rows)
