"""One selection for a channel group whose consumers read different tensors.

A squeeze-excitation gate's ``fc1`` reads the pooled activations while the projection reads
the gated ones: one set of kept channels ``J`` must serve both, but each consumer gets its own
least-squares interpolation ``T_c`` from its own rows.

``J`` is the pivoted ID of the readings stacked, each scaled to unit Frobenius norm,
``[Z_1/‖Z_1‖; Z_2/‖Z_2‖; ...]``: every consumer's input counts the same whatever its number of
rows or its scale (the pooled tensor has one row per image, the gated one a row per pixel), and
the error curve is the root mean square of the readings' relative errors with one shared ``T``
— an upper bound for the errors with each consumer's own ``T_c``.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg

from .. import _array
from .._linalg import PivotedFactorization, factorize_triangular

__all__ = ["JointFactorization", "interpolations_for"]


class JointFactorization:
    """Pivoted factorization of several readings of one group's channels.

    Parameters
    ----------
    factors : list of ndarray of shape (p_c, m)
        A square-root factor ``R_c`` per reading, ``R_cᵀ R_c = Z_cᵀ Z_c``.
    dtype_eps : float
        Rounding unit of the factors' accuracy (trusted-rank cutoff of the joint factor).
    """

    def __init__(self, factors, dtype_eps: float):
        self.factors = [np.asarray(f, dtype=np.float64) for f in factors]
        scaled = []
        for factor in self.factors:
            norm = float(np.linalg.norm(factor))
            scaled.append(factor / norm if norm > 0 else factor)
        self.joint: PivotedFactorization = factorize_triangular(np.vstack(scaled), dtype_eps)

    @classmethod
    def from_accumulators(cls, accumulators) -> JointFactorization:
        """From streamed ``GramAccumulator``/``QRAccumulator`` statistics, one per reading."""
        factors, eps = [], float(np.finfo(np.float64).eps)
        for acc in accumulators:
            if hasattr(acc, "gram"):
                factors.append(_gram_root(_array.to_numpy(acc.gram)))
                eps = max(eps, float(np.sqrt(np.finfo(np.float64).eps)))
            else:
                factors.append(_array.to_numpy(acc.R))
                eps = max(eps, float(np.finfo(acc.dtype).eps))
        return cls(factors, eps)

    @property
    def n_features(self) -> int:
        return self.joint.n_features

    @property
    def errors(self) -> np.ndarray:
        """Root-mean-square relative error over the readings, with one shared ``T``."""
        return self.joint.errors

    @property
    def perm(self) -> np.ndarray:
        return self.joint.perm

    def select(self, k: int):
        """Kept channels (pivot order) and the shared interpolation matrix (k, m)."""
        return self.joint.select(k)

    def interpolations(self, keep) -> list[np.ndarray]:
        """Each reading's least-squares ``T_c`` (k, m) for the kept channels ``keep``."""
        keep = np.asarray(keep, dtype=np.int64)
        result = []
        for factor in self.factors:
            T, *_ = scipy.linalg.lstsq(factor[:, keep], factor, check_finite=False)
            T[:, keep] = np.eye(keep.size)  # exact on the kept channels
            result.append(T)
        return result


def _gram_root(gram: np.ndarray) -> np.ndarray:
    """``R`` with ``RᵀR = G`` for a symmetric positive semidefinite ``G`` (eigenvalues >= 0)."""
    gram = np.asarray(gram, dtype=np.float64)
    if not np.isfinite(gram).all():
        raise ValueError("The statistics hold NaN or infinite values.")
    values, vectors = np.linalg.eigh((gram + gram.T) / 2)
    return np.sqrt(np.maximum(values, 0.0))[:, None] * vectors.T


def interpolations_for(unit, fac, keep, T):
    """Per-consumer interpolation matrices of a group, or None when all share ``T``."""
    if not isinstance(fac, JointFactorization):
        return None
    per_reading = fac.interpolations(keep)
    return tuple(per_reading[c.reads] for c in unit.consumers)
