"""Corrective least squares: the kept channels of a compressed input fitted to an original one.

A consumer of a compressed network sees ``Z_c`` (n × m) where the original network fed it
``Z_o`` (n × m, same channels). The corrective fit keeps channels ``J`` and folds

    ``T = argmin ‖Z_o − Z_c[:, J] T‖_F``  (k × m),

so the consumer sees what the original model fed it, upstream errors included. Everything
comes from two streamed statistics of a size independent of n:

* the Gram route: ``G = Z_cᵀ Z_c``, the cross statistic ``C = Z_cᵀ Z_o`` and ``‖Z_o‖_F²``
  (float64 sums, on the rows' device);
* the QR route: the R factor of a TSQR of ``[Z_c | Z_o]``, i.e. ``R11`` (a triangular factor
  of ``Z_c``), ``R12 = Q1ᵀ Z_o`` and ``‖R22‖_F²`` (accurate to the data's rounding).

Either route gives a pivoted triangular factor ``U`` of ``Z_c`` (``Z_c[:, P] = Q U``) and
``V = Qᵀ Z_o`` (r × m, rows in pivot order). The squared LS residual keeping the first k
pivots is ``‖Z_o‖² − Σ_{i<k} ‖V_i‖²`` — the whole error curve from one factorization — and
``T`` comes from triangular solves with ``U``. ``J`` is chosen either from the compressed
Gram (pivoted Cholesky: the largest remaining norm of ``Z_c``, as the plain ID) or greedily
on the cross statistic (the channel whose addition most reduces the residual against ``Z_o``).

When ``Z_c = Z_o`` the corrective fit *is* the ID of ``Z_o``: the same pivots, T and errors.
The statistic is per unit of consumer input, so it applies unchanged to any set of channels
read by one consumer (a channel group's consumer, a block's).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import scipy.linalg

from . import _array, _centred
from ._linalg import (  # the Gram route blocks rows as GramAccumulator does
    BLOCK_ELEMENTS,
    NATIVE_BLOCK_ROWS,
    QRAccumulator,
    factorize_gram,
    row_blocks,
)

__all__ = [
    "SELECTIONS",
    "CorrectiveFactorization",
    "CrossAccumulator",
    "CrossStatistics",
]

#: Ways to choose J: ``"gram"`` (pivoted Cholesky of the compressed Gram, the default — see
#: benchmarks/README.md, bench_fidelity.py) and ``"greedy"`` (greedy on the cross statistic).
SELECTIONS = ("gram", "greedy")


@dataclass(frozen=True)
class CrossStatistics:
    """The streamed statistics of one consumer input, on the host (what ``memory=`` stores).

    Attributes
    ----------
    method : {"gram", "qr"}
    first : ndarray of shape (m, m)
        ``G = Z_cᵀ Z_c`` (gram) or ``R11`` (qr).
    cross : ndarray of shape (m, m)
        ``C = Z_cᵀ Z_o`` (gram) or ``R12`` (qr).
    sq_norm : float
        ``‖Z_o‖_F²``.
    eps : float
        Unit roundoff of the products (float32 products: ``eps32``): pivots of ``Z_c`` at that
        rounding level are not trusted (their channels, if kept, keep identity rows of T).
    n_samples : int
        Rows accumulated.
    unchanged : bool
        Every block had ``Z_c = Z_o``: the fit is then the plain ID of ``Z_c``, exactly (its
        ``T`` at full width is the identity, not the identity plus rounding).
    sq_cols : ndarray of shape (m,) or None
        ``‖Z_o[:, j]‖²`` per channel (what weighted errors need; None in statistics stored
        before it was kept).
    means : tuple of ndarray or None
        ``fit_intercept``: the column means ``(μ_c, μ_o)``; ``first``, ``cross`` and
        ``sq_norm`` are then those of the centred ``Z_c − 1 μ_cᵀ`` and ``Z_o − 1 μ_oᵀ`` (the
        least-squares fit with a constant column is the fit of the centred data, and its
        constant is ``μ_o − Tᵀ μ_c[keep]``).
    scale : float
        Relative errors are multiplied by it: ``‖Z_o − 1 μ_oᵀ‖_F / ‖Z_o‖_F`` with means (the
        errors stay relative to ``‖Z_o‖_F``), 1 without.
    """

    method: str
    first: np.ndarray
    cross: np.ndarray
    sq_norm: float
    eps: float
    n_samples: int
    unchanged: bool = False
    sq_cols: np.ndarray | None = None
    means: tuple | None = None
    scale: float = 1.0

    @property
    def n_features(self) -> int:
        return self.first.shape[1]

    def factorize(self, selection: str = "gram") -> CorrectiveFactorization:
        """The corrective factorization, ``J`` chosen by ``selection`` (one of SELECTIONS)."""
        if selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}; got {selection!r}.")
        if not (np.isfinite(self.first).all() and np.isfinite(self.cross).all()):
            raise ValueError("The statistics hold NaN or infinite values.")
        if self.method == "gram":
            if selection == "gram":
                perm, U = _pivoted_cholesky(self.first, self.eps)
                V = scipy.linalg.solve_triangular(
                    U[:, : U.shape[0]], self.cross[perm[: U.shape[0]]], trans="T",
                    check_finite=False)
            else:
                perm, U, V = _greedy(self.first, self.cross, _gram_ratio(self.eps))
        else:
            perm, U, V = _triangular_route(self.first, self.cross, self.eps, selection)
        if self.unchanged:  # Qᵀ Z_o = Qᵀ Z_c = U (columns back in channel order)
            V = np.empty_like(U)
            V[:, perm] = U
        fac = CorrectiveFactorization(perm, U, V, self.sq_norm)
        fac.errors = fac.errors * self.scale
        fac.means = self.means
        return fac

    def factorize_weighted(self, scale) -> CorrectiveFactorization:
        """The corrective factorization for a consumer that weighs channel ``j`` by
        ``scale[j]`` (the norm of its weights on the channel): ``J`` from the pivoted
        Cholesky of the Gram of ``Z_c D`` (``D = diag(scale)``), ``T`` still the
        least-squares fit of ``Z_o`` (unweighted: it is column by column), and ``errors`` the
        weighted ``‖(Z_o − Z_c[:, J] T) D‖_F / ‖Z_o D‖_F``.
        """
        scale = np.asarray(scale, dtype=np.float64).reshape(-1)
        m = self.n_features
        if scale.shape != (m,) or not np.isfinite(scale).all() or (scale < 0).any():
            raise ValueError(f"scale must hold {m} finite nonnegative numbers.")
        if self.sq_cols is None:
            raise ValueError("These statistics hold no per-channel norms (stored by an older "
                             "skid): clear the memory= cache and fit again.")
        if self.method == "gram":
            G, C = self.first, self.cross
        else:  # Z_c = Q R11, Q1ᵀ Z_o = R12
            G, C = self.first.T @ self.first, self.first.T @ self.cross
        perm, U_scaled = _pivoted_cholesky(G * np.outer(scale, scale), self.eps)
        r = U_scaled.shape[0]  # trusted pivots have scale > 0
        U_r = U_scaled[:, :r] / scale[perm[:r]]  # the factor of Z_c's own kept columns
        U = scipy.linalg.solve_triangular(U_r, G[np.ix_(perm[:r], perm)], trans="T",
                                          check_finite=False)
        V = scipy.linalg.solve_triangular(U_r, C[perm[:r]], trans="T", check_finite=False)
        if self.unchanged:  # Qᵀ Z_o = Qᵀ Z_c = U (columns back in channel order)
            V = np.empty_like(U)
            V[:, perm] = U
        weights = scale**2
        fac = CorrectiveFactorization(perm, U, V, float(weights @ self.sq_cols), weights)
        if self.means is not None:  # fit_intercept: centred statistics, their constant
            fac.errors = fac.errors * self.scale  # (the activations' ratio, approximately)
            fac.means = self.means
        return fac

    def fit(self, keep, weights=None):
        """``T`` for channels chosen elsewhere (e.g. one selection shared by a channel group
        whose consumers each have their own statistics).

        Parameters
        ----------
        keep : array-like of int, shape (k,)
            Kept channels.
        weights : ndarray of shape (m,), optional
            Per-channel weights of the error (as in :meth:`factorize_weighted`).

        Returns
        -------
        keep : ndarray of shape (k,)
            The same channels, reordered by a pivoting within them (the rows of ``T``).
        T : ndarray of shape (k, m)
            Least-squares fit of ``Z_o`` from ``Z_c[:, keep]`` (numerically dependent kept
            channels keep identity rows, as in :meth:`CorrectiveFactorization.select`).
        error : float
            ``‖Z_o − Z_c[:, keep] T‖_F / ‖Z_o‖_F``.
        """
        keep = np.asarray(keep, dtype=np.int64).reshape(-1)
        m = self.n_features
        distinct = np.unique(keep).size == keep.size
        if keep.size == 0 or keep.min() < 0 or keep.max() >= m or not distinct:
            raise ValueError(f"keep must hold distinct channel indices in [0, {m}); got {keep}.")
        if self.method == "gram":
            sub = factorize_gram(self.first[np.ix_(keep, keep)])
            r = _trusted(np.diag(sub.U), _gram_ratio(self.eps))
            keep = keep[sub.perm]
            U_kk = sub.U[:r, :r]
            U = scipy.linalg.solve_triangular(U_kk, self.first[keep[:r]], trans="T",
                                              check_finite=False)
            V = scipy.linalg.solve_triangular(U_kk, self.cross[keep[:r]], trans="T",
                                              check_finite=False)
        else:
            Q, U_kk, p = scipy.linalg.qr(self.first[:, keep], pivoting=True, check_finite=False)
            r = _trusted(np.diag(U_kk), m * self.eps)
            keep, U_kk = keep[p], U_kk[:r, :r]
            U, V = Q[:, :r].T @ self.first, Q[:, :r].T @ self.cross
        if self.unchanged:
            V = U
        T = np.zeros((keep.size, m))
        T[np.arange(keep.size), keep] = 1.0
        if r:
            B = V - np.where(np.isin(np.arange(m), keep), U, 0.0)
            T[:r] += scipy.linalg.solve_triangular(U_kk, B, check_finite=False)
        return keep, T, self._relative_error(keep, T, weights)

    def _relative_error(self, keep, T, weights=None) -> float:
        """``‖Z_o − Z_c[:, keep] T‖_F / ‖Z_o‖_F`` from the statistics (columns weighted by
        ``weights``, if given)."""
        if weights is not None:
            return self._weighted_error(keep, T, np.asarray(weights, dtype=np.float64))
        if self.sq_norm <= 0:
            return 0.0
        return self.scale * self._centred_error(keep, T)

    def _centred_error(self, keep, T) -> float:
        """The error relative to the statistics' own ``sq_norm`` (centred with ``means``)."""
        if self.method == "gram":
            G, C = self.first[np.ix_(keep, keep)], self.cross[keep]
            sq = self.sq_norm - 2 * np.vdot(T, C) + np.vdot(T, G @ T)
        else:  # Z_c = Q R11, Z_o = Q R12 + (the rest, orthogonal to Q)
            R11, R12 = self.first, self.cross
            sq = np.sum((R12 - R11[:, keep] @ T) ** 2) + self.sq_norm - np.sum(R12**2)
        return float(np.sqrt(max(sq, 0.0) / self.sq_norm))


    def _weighted_error(self, keep, T, weights) -> float:
        if self.sq_cols is None:
            raise ValueError("These statistics hold no per-channel norms (stored by an older "
                             "skid): clear the memory= cache and fit again.")
        total = float(weights @ self.sq_cols)
        if total <= 0:
            return 0.0
        if self.method == "gram":
            G, C = self.first[np.ix_(keep, keep)], self.cross[keep]
            per_column = self.sq_cols - 2 * np.einsum("kj,kj->j", T, C) + np.einsum(
                "kj,kj->j", T, G @ T)
        else:
            R11, R12 = self.first, self.cross
            per_column = (np.sum((R12 - R11[:, keep] @ T) ** 2, axis=0) + self.sq_cols
                          - np.sum(R12**2, axis=0))
        return float(np.sqrt(max(float(weights @ per_column), 0.0) / total))


def fit_kept(stats: CrossStatistics, keep, blocks: int = 1):
    """``T`` (rows in the order of ``keep``) and its error for channels chosen elsewhere.

    With ``blocks > 1`` (a grouped convolution reads the channels) each of the equal channel
    blocks is fitted from its own kept channels only, so ``T`` is block-diagonal.
    """
    keep = np.asarray(keep, dtype=np.int64).reshape(-1)
    m = stats.n_features
    size = m // blocks
    T = np.zeros((keep.size, m))
    for b in range(blocks):
        cols = np.arange(b * size, (b + 1) * size)
        rows = np.flatnonzero((keep >= cols[0]) & (keep <= cols[-1]))
        if blocks == 1:
            sub = stats
        elif stats.method == "gram":
            sub = replace(stats, first=stats.first[np.ix_(cols, cols)],
                          cross=stats.cross[np.ix_(cols, cols)])
        else:
            sub = replace(stats, first=stats.first[:, cols], cross=stats.cross[:, cols])
        local = keep[rows] - cols[0]
        fitted, T_b, _ = sub.fit(local)
        position = {int(c): i for i, c in enumerate(local)}
        T[rows[[position[int(c)] for c in fitted]], cols[0]:cols[-1] + 1] = T_b
    return T, stats._relative_error(keep, T)


def _trusted(diag: np.ndarray, ratio: float) -> int:
    """Leading pivots whose triangular-factor diagonal exceeds ``ratio`` times the first."""
    diag = np.abs(diag)
    if diag.size == 0 or diag[0] == 0:
        return 0
    below = np.flatnonzero(diag <= diag[0] * ratio)
    return int(below[0]) if below.size else diag.size


def _gram_ratio(eps: float) -> float:
    """Trusted pivots of a Gram route: residual norm² above ``16 eps`` of the largest.

    A Gram of products rounded to ``eps`` is off by about ``eps · ‖Z‖²`` per entry, so
    directions whose residual is at that level are rounding, not data.
    """
    return float(np.sqrt(16 * eps))


def _pivoted_cholesky(gram, eps):
    """Pivot order and the trusted rows of the pivoted Cholesky factor (r × m, pivot order)."""
    fac = factorize_gram(gram)
    r = _trusted(np.diag(fac.U), _gram_ratio(eps))
    return fac.perm, fac.U[:r]


def _greedy(gram, cross, ratio):
    """Forward stepwise selection on the cross statistic.

    Each step adds the channel of ``Z_c`` that most reduces the least-squares residual of
    ``Z_o``: score ``‖c_j‖² / d_j``, with ``d_j`` the residual norm² of channel j and ``c_j``
    its residual cross row, both updated by the new Cholesky column. Channels whose ``d_j``
    falls to ``ratio²`` of the largest diagonal are rounding and never chosen.

    Returns the pivot order (chosen pivots first, then the rest by decreasing ``d_j``), U
    (r × m, pivot order) and V (r × m) for the r chosen pivots.
    """
    m = gram.shape[0]
    d = np.diag(gram).copy()
    floor = max(d.max(initial=0.0), 0.0) * ratio**2
    c = cross.copy()
    L = np.zeros((m, m))  # column s: the Cholesky column of the s-th chosen channel
    V = np.zeros((m, cross.shape[1]))
    order, free = [], np.ones(m, dtype=bool)
    for step in range(m):
        usable = free & (d > floor)
        if not usable.any():
            break
        score = np.einsum("ij,ij->i", c, c) / np.where(usable, d, 1.0)
        p = int(np.argmax(np.where(usable, score, -1.0)))
        root = np.sqrt(d[p])
        L[:, step] = (gram[:, p] - L[:, :step] @ L[p, :step]) / root
        V[step] = c[p] / root
        c -= np.outer(L[:, step], V[step])
        d -= L[:, step] ** 2
        free[p] = False
        order.append(p)
    r = len(order)
    rest = np.flatnonzero(free)
    perm = np.concatenate([order, rest[np.argsort(-d[rest], kind="stable")]]).astype(np.int64)
    return perm, np.triu(L[perm, :r].T), V[:r]


def _triangular_route(R11, R12, eps, selection):
    """Pivot order, U and V from the TSQR blocks (no Gram: accurate to the data's rounding)."""
    m = R11.shape[1]
    ratio = m * eps
    if selection == "gram":
        Q, U, perm = scipy.linalg.qr(R11, pivoting=True, check_finite=False)
    else:
        perm, _, _ = _greedy(R11.T @ R11, R11.T @ R12, ratio)
        Q, U = scipy.linalg.qr(R11[:, perm], check_finite=False)
    r = _trusted(np.diag(U), ratio)
    return perm.astype(np.int64), U[:r], (Q.T @ R12)[:r]


class CorrectiveFactorization:
    """Pivoted factor of ``Z_c`` and the projection of ``Z_o``: error curve and ``T`` per k.

    Parameters
    ----------
    perm : ndarray of shape (m,)
        Pivot order of the channels.
    U : ndarray of shape (r, m)
        Upper-trapezoidal factor of ``Z_c[:, perm]`` (its r trusted rows).
    V : ndarray of shape (r, m)
        ``Qᵀ Z_o`` for the same orthonormal ``Q`` (columns in the original channel order).
    sq_norm : float
        ``‖Z_o‖_F²`` (with ``weights``: ``Σ_j weights[j] ‖Z_o[:, j]‖²``).
    weights : ndarray of shape (m,), optional
        Per-channel weights of the errors (see :meth:`CrossStatistics.factorize_weighted`).

    Attributes
    ----------
    errors : ndarray of shape (m + 1,)
        Relative error ``‖Z_o − Z_c[:, J_k] T_k‖_F / ‖Z_o‖_F`` keeping the first k pivots,
        nonincreasing; it need not reach 0 (upstream errors the kept channels cannot undo).
    """

    def __init__(self, perm, U, V, sq_norm, weights=None):
        self.perm, self.U, self.V, self.sq_norm = perm, U, V, float(sq_norm)
        r = U.shape[0]
        m = perm.shape[0]
        sq_tail = np.empty(m + 1)
        sq_tail[0] = self.sq_norm
        energy = np.einsum("ij,ij->i", V, V if weights is None else V * weights)
        sq_tail[1 : r + 1] = self.sq_norm - np.cumsum(energy)
        sq_tail[r + 1 :] = sq_tail[r]
        sq_tail = np.minimum.accumulate(np.maximum(sq_tail, 0.0))
        self.errors = (np.sqrt(sq_tail / self.sq_norm) if self.sq_norm > 0
                       else np.zeros(m + 1))

    @property
    def n_features(self) -> int:
        return self.perm.shape[0]

    @property
    def trusted_rank(self) -> int:
        return self.U.shape[0]

    def select(self, k: int):
        """Kept channels (pivot order) and ``T`` (k × m), the least-squares fit to ``Z_o``.

        ``T = E + D``: ``E`` keeps every kept channel as it is (identity rows) and ``D``, on
        the trusted pivots only, is the least-squares correction of the residual
        ``Z_o − Z_c[:, J] E``. Numerically dependent kept channels keep their identity rows,
        and where ``Z_c = Z_o`` on the kept channels ``D`` is exactly what the plain ID's
        ``T`` adds (0 at full width).
        """
        m = self.n_features
        keep = self.perm[:k].copy()
        t = min(k, self.trusted_rank)
        T = np.zeros((k, m))
        T[np.arange(k), keep] = 1.0
        if t > 0:
            U_orig = np.empty((t, m))
            U_orig[:, self.perm] = self.U[:t]  # U's columns back in channel order
            B = self.V[:t].copy()
            B[:, keep] -= U_orig[:, keep]
            T[:t] += scipy.linalg.solve_triangular(self.U[:t, :t], B, check_finite=False)
        return keep, T


class CrossAccumulator:
    """Streams paired row blocks ``(Z_c, Z_o)`` into :class:`CrossStatistics`.

    Parameters
    ----------
    method : {"gram", "qr"}
        ``G``, ``C`` and ``‖Z_o‖²`` (one GEMM of each block by ``[Z_c | Z_o]``), or the R
        factor of a TSQR of ``[Z_c | Z_o]`` (2m columns, in the data's dtype).
    precision : {"float64", "native"}
        Gram route: products of float32 blocks in float32, summed in float64 every
        ``NATIVE_BLOCK_ROWS`` rows (``"native"``), or in float64 (as
        :class:`skid._linalg.GramAccumulator`).
    intercept : bool
        Also the column means, for a fit with a constant column (``fit_intercept``): the
        statistics come out centred (see :class:`CrossStatistics`). The Gram route sums the
        columns; the QR route factors ``[1 | Z_c | Z_o]``, whose first row holds the means
        and whose rest is the factor of the centred blocks.
    """

    def __init__(self, method: str = "gram", precision: str = "float64", intercept=False):
        self.method = method
        self.precision = precision
        self.intercept = bool(intercept)
        self._sums = None
        self.n_features = None
        self.n_samples = 0
        self._gram = self._cross = None
        self._sq_norm = 0.0
        self._sq_cols = None
        self._unchanged = True
        self._eps = float(np.finfo(np.float64).eps)
        self._qr = QRAccumulator() if method == "qr" else None

    def update(self, Zc, Zo=None) -> CrossAccumulator:
        """Add paired rows; ``Zo=None`` (or equal to ``Zc`` up to rounding) means the input
        is unchanged.

        An unchanged input reuses the Gram product for the cross statistic, so that the fit
        then equals the plain ID bit for bit (and costs one product, not two).
        """
        same = Zo is None or Zo is Zc or _agree(Zc, Zo)
        self._unchanged &= same
        Zo = Zc if Zo is None else Zo
        if Zc.ndim != 2 or tuple(Zc.shape) != tuple(Zo.shape):
            raise ValueError(
                f"Paired blocks must be 2-D and of equal shapes; got {tuple(Zc.shape)} and "
                f"{tuple(Zo.shape)}.")
        if self.n_features is not None and Zc.shape[1] != self.n_features:
            raise ValueError(f"This block has {Zc.shape[1]} columns; earlier ones had "
                             f"{self.n_features}.")
        self.n_features = Zc.shape[1]
        self.n_samples += Zc.shape[0]
        if self.intercept and self._qr is None:
            sums_c = _centred.column_sums(Zc)
            sums = (sums_c, sums_c if same else _centred.column_sums(Zo))
            self._sums = sums if self._sums is None else tuple(
                a + b for a, b in zip(self._sums, sums, strict=True))
        if self._qr is not None:
            block = _hstack(Zc, Zo)
            self._qr.update(_hstack(_centred.ones_like(block), block) if self.intercept else block)
            self._eps = float(np.finfo(self._qr.dtype).eps)
            return self
        dtype = "float64" if self.precision == "float64" else _array.float_dtype_for(Zc)
        if dtype == "float32" and not _array.exact_float32_matmul(Zc):
            dtype = "float64"  # TF32/bf16 products would lose the digits the ID needs
        if dtype == "float32":
            self._eps = max(self._eps, float(np.finfo(np.float32).eps))
        if self._gram is None:
            self._gram = _array.zeros((self.n_features,) * 2, Zc, "float64")
            self._cross = _array.zeros((self.n_features,) * 2, Zc, "float64")
            self._sq_cols = _array.zeros((self.n_features,), Zc, "float64")
        step = NATIVE_BLOCK_ROWS * self.n_features if dtype == "float32" else BLOCK_ELEMENTS
        for rows in row_blocks(Zc.shape[0], self.n_features, step):
            bc = _array.astype(Zc[rows], dtype)
            gram = _array.astype(bc.T @ bc, "float64")
            self._gram += gram
            if same:
                self._cross += gram
                self._sq_norm += float(_trace(gram))
                self._sq_cols += gram.diagonal()
            else:
                bo = _array.astype(Zo[rows], dtype)
                self._cross += _array.astype(bc.T @ bo, "float64")
                self._sq_norm += _array.frob_norm(bo) ** 2
                self._sq_cols += _array.astype((bo * bo).sum(0), "float64")
        return self

    def merge_over(self, width: int, *, all_sum, all_max, reduce_r) -> CrossAccumulator:
        """Combine this accumulator with its peers on other processes, in place.

        Every process of the group calls it (one without rows too), with the group's
        collectives: ``all_sum(array)`` (the elementwise sum over the group, of the same
        kind), ``all_max(list of int)`` (the elementwise maximum), and ``reduce_r(acc, width,
        scale_exp)`` (the TSQR factors of a :class:`skid._linalg.QRAccumulator` stacked
        over the group at a common scale). The result is what one process would have
        accumulated from all the rows: Gram and cross statistic summed, or the R factors of
        ``[Z_c | Z_o]`` stacked. An input counts as unchanged only if it is on every process,
        and float32 products on any process set the rounding that is trusted.

        Parameters
        ----------
        width : int
            Columns of ``Z_c`` (for a process that saw no rows).
        """
        (rows,) = all_sum(np.array([self.n_samples], dtype=np.int64)).tolist()
        changed, finer = all_max([int(not self._unchanged), int(self._eps > 1e-10)])
        self._unchanged, self.n_samples, self.n_features = not changed, int(rows), width
        if finer:  # some process multiplied in float32: its rounding decides what is trusted
            self._eps = max(self._eps, float(np.finfo(np.float32).eps))
        if self._qr is not None:
            (exp,) = all_max([self._qr.scale_exp])
            reduce_r(self._qr, 2 * width + self.intercept, exp)  # [1 |] Z_c | Z_o
            return self

        def statistic(value, shape):  # a process without rows adds zeros
            return np.zeros(shape) if value is None else value

        self._gram = all_sum(statistic(self._gram, (width, width)))
        self._cross = all_sum(statistic(self._cross, (width, width)))
        self._sq_cols = all_sum(statistic(self._sq_cols, (width,)))
        self._sq_norm = float(all_sum(np.array([self._sq_norm]))[0])
        if self.intercept:  # the column sums of fit_intercept
            self._sums = tuple(all_sum(statistic(v, (width,)))
                               for v in (self._sums or (None, None)))
        return self

    def statistics(self) -> CrossStatistics:
        """The host statistics accumulated so far."""
        if self.n_features is None:
            raise ValueError("No data has been accumulated yet.")
        m = self.n_features
        if self._qr is not None:
            c = int(self.intercept)  # the constant column, first
            R = np.zeros((2 * m + c, 2 * m + c))
            R_acc = _array.to_numpy(self._qr.R).astype(np.float64)
            R[: R_acc.shape[0]] = R_acc
            means, scale = None, 1.0
            if c:
                R, means, scale = _centred.centred_triangular(R, m)
            sq_cols = np.sum(R[:, m:] ** 2, axis=0)
            sq_norm = float(sq_cols.sum())
            return CrossStatistics("qr", R[:m, :m], R[:m, m:], sq_norm, self._eps,
                                   self.n_samples, self._unchanged, sq_cols, means=means,
                                   scale=scale)
        gram, cross = _array.to_numpy(self._gram), _array.to_numpy(self._cross)
        sq_cols = np.asarray(_array.to_numpy(self._sq_cols), dtype=np.float64)
        if not self.intercept:
            return CrossStatistics("gram", gram, cross, self._sq_norm, self._eps,
                                   self.n_samples, self._unchanged, sq_cols)
        G, C, sq_norm, sq_cols, means, scale = _centred.centred_gram(
            gram, cross, self._sq_norm, sq_cols, self._sums, self.n_samples)
        return CrossStatistics("gram", G, C, sq_norm, self._eps, self.n_samples,
                               self._unchanged, sq_cols, means=means, scale=scale)


def _agree(A, B) -> bool:
    """``‖A − B‖_F ≤ max(m, 16) · eps · ‖B‖_F``: equal to the rounding of their dtype.

    Copies of one model whose weights differ only in memory layout (a folded weight with
    other strides) take other kernels and round differently; such inputs are unchanged, and
    fitting the rounding would only add noise to ``T``.
    """
    if tuple(A.shape) != tuple(B.shape) or _array.array_kind(A) != _array.array_kind(B):
        return False
    if _array.dtype_name(A) != _array.dtype_name(B):
        return False
    if _array.array_kind(A) == "torch":
        import torch

        if A.device != B.device:
            return False
        eps = torch.finfo(A.dtype).eps  # half precision rounds at its own eps
        if torch.equal(A, B):
            return True
        gap, norm = torch.linalg.vector_norm(A - B), torch.linalg.vector_norm(B)
        return bool(gap <= max(A.shape[1], 16) * eps * norm)
    eps = float(np.finfo(A.dtype).eps)
    xp = _array.array_namespace(A)
    return bool(xp.linalg.norm(A - B) <= max(A.shape[1], 16) * eps * xp.linalg.norm(B))


def _hstack(A, B):
    """Column-stack two blocks of the same kind."""
    if _array.array_kind(A) == "torch":
        import torch

        return torch.cat([A, B], dim=1)
    if _array.array_kind(A) == "cupy":
        import cupy

        return cupy.hstack([A, B])
    return np.hstack([A, B])


def _trace(A) -> float:
    """Trace of a square array of any kind, as a float."""
    if _array.array_kind(A) == "torch":
        return float(A.diagonal().sum())
    return float(A.trace())
