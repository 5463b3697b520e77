"""One selection for a channel group whose consumers read different tensors.

A squeeze-excitation gate's ``fc1`` reads the pooled activations while the projection reads
the gated ones: one set of kept channels ``J`` must serve both, but each consumer gets its own
least-squares interpolation ``T_c`` from its own rows.

``J`` is the pivoted ID of the readings stacked, each scaled to unit Frobenius norm,
``[Z_1/‖Z_1‖; Z_2/‖Z_2‖; ...]``: every consumer's input counts the same whatever its number of
rows or its scale (the pooled tensor has one row per image, the gated one a row per pixel), and
the error curve is the root mean square of the readings' relative errors with one shared ``T``
— an upper bound for the errors with each consumer's own ``T_c``. A residual stream sums them
instead (``UnitKind.sums_readings``): each of its readings feeds another block, and every one of
them sees the error.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg

from .. import _array
from .._linalg import PivotedFactorization, factorize_triangular

__all__ = ["BlockFactorization", "JointFactorization", "interpolations_for", "reading_error"]


def reading_error(squared, summed: bool) -> float:
    """A unit's error from its readings' squared relative errors: the root of their sum
    (``summed``: a residual stream, read once per block) or of their mean (a gate's or a
    fan-out's readings of one block); the unit's kind says which
    (:attr:`skid.nn._unit_kinds.UnitKind.sums_readings`)."""
    return float(np.sqrt(np.sum(squared) if summed else np.mean(squared)))


class JointFactorization:
    """Pivoted factorization of several readings of one group's channels.

    Parameters
    ----------
    factors : list of ndarray of shape (p_c, m)
        A square-root factor ``R_c`` per reading, ``R_cᵀ R_c = Z_cᵀ Z_c``.
    dtype_eps : float
        Rounding unit of the factors' accuracy (trusted-rank cutoff of the joint factor).
    summed : bool, default=False
        ``errors`` is the root of the sum of the readings' squared relative errors, not of
        their mean (the selection is the same).
    """

    def __init__(self, factors, dtype_eps: float, summed: bool = False):
        self.factors = [np.asarray(f, dtype=np.float64) for f in factors]
        self._scale = np.sqrt(len(self.factors)) if summed else 1.0
        scaled = []
        for factor in self.factors:
            norm = float(np.linalg.norm(factor))
            scaled.append(factor / norm if norm > 0 else factor)
        self.joint: PivotedFactorization = factorize_triangular(np.vstack(scaled), dtype_eps)

    @classmethod
    def from_accumulators(cls, accumulators, summed: bool = False) -> JointFactorization:
        """From streamed ``GramAccumulator``/``QRAccumulator`` statistics, one per reading."""
        return cls(*_roots(accumulators), summed=summed)

    @property
    def n_features(self) -> int:
        return self.joint.n_features

    @property
    def errors(self) -> np.ndarray:
        """Root-mean-square (``summed``: root-sum-square) relative error over the readings,
        with one shared ``T``."""
        return self.joint.errors * self._scale

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
    if unit.n_readings == 1 or not hasattr(fac, "interpolations"):
        return None
    per_reading = fac.interpolations(keep)
    return tuple(per_reading[c.reads] for c in unit.consumers)


class BlockFactorization:
    """Selection within each of ``blocks`` equal channel blocks (a grouped convolution).

    A grouped convolution reading (or producing) the channels sees each block on its own, so
    every block keeps the same number of channels ``j`` (``groups`` stays valid) chosen by its
    own pivoted ID, and ``T`` is block-diagonal. The readings are weighted as in
    :class:`JointFactorization`. ``errors[k]`` is the relative error of keeping ``k // blocks``
    channels per block (the width is rounded down to a multiple of ``blocks``, at least one
    per block).

    Parameters
    ----------
    factors : list of ndarray of shape (p_c, m)
        A square-root factor per reading.
    dtype_eps : float
    blocks : int
        Number of channel blocks; divides ``m``.
    summed : bool, default=False
        As in :class:`JointFactorization`.
    """

    def __init__(self, factors, dtype_eps: float, blocks: int, summed: bool = False):
        self.factors = [np.asarray(f, dtype=np.float64) for f in factors]
        m = self.factors[0].shape[1]
        if m % blocks:
            raise ValueError(f"{m} channels cannot form {blocks} equal blocks")
        self.blocks, self.size = blocks, m // blocks
        weights = [1 / n if (n := float(np.linalg.norm(f))) > 0 else 1.0 for f in self.factors]
        self.parts = []
        for b in range(blocks):
            columns = np.arange(b * self.size, (b + 1) * self.size)
            stacked = np.vstack([w * f[:, columns] for w, f in zip(weights, self.factors,
                                                                    strict=True)])
            self.parts.append((columns, factorize_triangular(stacked, dtype_eps)))
        sq_norms = np.array([fac.sq_norm for _, fac in self.parts])
        tails = sum(fac.errors ** 2 * sq for (_, fac), sq in zip(self.parts, sq_norms,
                                                                  strict=True))
        total = float(sq_norms.sum())
        per_block = np.sqrt(tails / total) if total > 0 else np.zeros(self.size + 1)
        scale = np.sqrt(len(self.factors)) if summed else 1.0
        self.errors = scale * per_block[np.arange(m + 1) // blocks]

    @classmethod
    def from_accumulators(cls, accumulators, blocks: int,
                          summed: bool = False) -> BlockFactorization:
        factors, eps = _roots(accumulators)
        return cls(factors, eps, blocks, summed)

    @property
    def n_features(self) -> int:
        return self.blocks * self.size

    def kept_per_block(self, k: int) -> int:
        return max(1, int(k) // self.blocks)

    def select(self, k: int):
        """Kept channels (block by block, pivot order within) and the block-diagonal T."""
        j = self.kept_per_block(k)
        keep = np.concatenate([columns[fac.perm[:j]] for columns, fac in self.parts])
        T = np.zeros((j * self.blocks, self.n_features))
        for b, (columns, fac) in enumerate(self.parts):
            T[b * j:(b + 1) * j, columns] = fac.select(j)[1]
        return keep, T

    def interpolations(self, keep) -> list[np.ndarray]:
        """Each reading's least-squares block-diagonal ``T_c`` for the kept channels."""
        keep = np.asarray(keep, dtype=np.int64)
        j = keep.size // self.blocks
        result = []
        for factor in self.factors:
            T = np.zeros((keep.size, self.n_features))
            for b, (columns, _) in enumerate(self.parts):
                rows = slice(b * j, (b + 1) * j)
                kept = keep[rows]
                block, *_ = scipy.linalg.lstsq(factor[:, kept], factor[:, columns],
                                               check_finite=False)
                block[:, kept - columns[0]] = np.eye(j)
                T[rows, columns] = block
            result.append(T)
        return result


def _roots(accumulators):
    """Square-root factors of streamed statistics and the rounding unit of their accuracy."""
    factors, eps = [], float(np.finfo(np.float64).eps)
    for acc in accumulators:
        if hasattr(acc, "gram"):
            factors.append(_gram_root(acc.host_gram()))
            eps = max(eps, float(np.sqrt(np.finfo(np.float64).eps)))
        else:
            factors.append(_array.to_numpy(acc.R))
            eps = max(eps, float(np.finfo(acc.dtype).eps))
    return factors, eps
