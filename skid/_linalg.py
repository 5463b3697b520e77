"""The statistics core of the ID: pure array code, no estimators, no torch modules.

A column ID ``X ≈ X[:, J] @ T`` comes from a column-pivoted triangular factor of ``X``
(n × m). Two streaming statistics, both of a size independent of n, give that factor:

* the Gram matrix ``XᵀX`` (accumulated in float64), factorized by pivoted Cholesky (LAPACK
  ``?pstrf``). One GEMM-like pass, the cheapest route; but the Gram squares the condition
  number, so errors and T are accurate only down to about ``sqrt(m * eps64) ≈ 1e-7`` relative
  (:data:`GRAM_RELIABLE_ERROR` is where we stop trusting it);
* the R factor of a tall-skinny QR (TSQR: ``R ← qr([R; X_block])``), re-pivoted with
  column-pivoted QR (LAPACK ``?geqp3``). About 2-4× the work, accurate to the rounding of the
  data's dtype.

Pivoted Cholesky on the Gram and column-pivoted QR on X choose the same pivots in exact
arithmetic (both pick the column of largest remaining norm). With ``U`` the pivoted triangular
factor, ``T = U11⁻¹ U12`` (a triangular solve) and ``‖X − X[:, J] T‖_F = ‖U22‖_F`` for every k,
so one factorization gives the exact error curve for all ranks at once.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import scipy.linalg
from scipy.linalg import lapack

from . import _array

#: Relative errors below this are not resolved by the Gram route (it squares the condition
#: number); requests that land there use the QR route.
GRAM_RELIABLE_ERROR = 1e-4

#: Relative errors below this are not resolved by a Gram of float32 products (summed in
#: float64 over blocks of ``_NATIVE_BLOCK_ROWS`` rows). Measured on 100,000 × 512 float32 data:
#: the error estimate is off by 5e-5 (relative) at 2e-2, 0.15 % at 2e-3, 1 % at 2e-4.
FLOAT32_GRAM_RELIABLE_ERROR = 1e-3

_NATIVE_BLOCK_ROWS = 4096

_BLOCK_ELEMENTS = 1 << 22  # a float64 row block of about 32 MB


_SMALL_FACTOR = 2048  # m × m steps up to this size run on one BLAS thread
_controller = None


def _small_step(m: int):
    """Context for an m × m step on the host: one BLAS thread when m is small.

    After the big product, the idle workers of NumPy's OpenBLAS keep spinning on the cores for
    a while; a multi-threaded SciPy LAPACK call started then competes with them and was
    measured 10× slower (≈130 ms instead of 11 ms for a 512 × 512 pivoted Cholesky).
    """
    global _controller
    if m > _SMALL_FACTOR:
        return contextlib.nullcontext()
    if _controller is None:
        from threadpoolctl import ThreadpoolController

        _controller = ThreadpoolController()
    return _controller.limit(limits=1, user_api="blas")


def row_blocks(n_rows: int, n_cols: int, max_elements: int = _BLOCK_ELEMENTS):
    """Slices that cut ``n_rows`` rows into blocks of at most ``max_elements`` entries."""
    step = max(1, max_elements // max(n_cols, 1))
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))


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
        ``‖X‖_F²``.
    errors : ndarray of shape (m + 1,)
        Relative Frobenius ID error keeping the first k pivots, k = 0..m.
    trusted_rank : int
        Rows of ``U`` whose diagonal is clear of rounding (solves use no more).
    """

    def __init__(self, perm, U, sq_norm, errors, trusted_rank):
        self.perm = perm
        self.U = U
        self.sq_norm = sq_norm
        self.errors = errors
        self.trusted_rank = trusted_rank

    @property
    def n_features(self) -> int:
        return self.perm.shape[0]

    def rank_for_tol(self, tol: float) -> int:
        """Smallest k ≥ 1 whose relative error is at most ``tol``."""
        return max(1, int(np.argmax(self.errors <= tol)))

    def numerical_rank(self, rel_tol: float) -> int:
        """Number of pivots with ``|U_kk| > rel_tol · |U_00|`` (at least 1)."""
        diag = np.abs(np.diag(self.U[: self.trusted_rank]))
        if diag.size == 0 or diag[0] == 0:
            return 1
        return max(1, int(np.count_nonzero(diag > rel_tol * diag[0])))

    def select(self, k: int):
        """Selected columns (pivot order) and the interpolation matrix T of shape (k, m)."""
        m = self.n_features
        k_solve = min(k, self.trusted_rank)
        T_pivoted = np.zeros((k, m))
        T_pivoted[:, :k] = np.eye(k)
        if k_solve > 0 and k < m:
            with _small_step(m):
                T_pivoted[:k_solve, k:] = scipy.linalg.solve_triangular(
                    self.U[:k_solve, :k_solve], self.U[:k_solve, k:], check_finite=False
                )
        T = np.empty_like(T_pivoted)
        T[:, self.perm] = T_pivoted
        return self.perm[:k].copy(), T


def _relative_errors(sq_tail: np.ndarray, sq_norm: float) -> np.ndarray:
    """Relative errors from the squared tail norms, made nonincreasing and ending at 0."""
    sq_tail = np.minimum.accumulate(np.maximum(sq_tail, 0.0))
    sq_tail[-1] = 0.0
    if sq_norm <= 0:
        return np.zeros_like(sq_tail)
    return np.sqrt(sq_tail / sq_norm)


def factorize_gram(gram: np.ndarray) -> PivotedFactorization:
    """Pivoted Cholesky of a Gram matrix ``XᵀX`` (float64, m × m)."""
    gram = np.asarray(gram, dtype=np.float64)
    if not np.isfinite(gram).all():
        raise ValueError(
            "The statistics hold NaN or infinite values: the data (or the activations) "
            "contain NaN/Inf. Check the input for non-finite values."
        )
    m = gram.shape[0]
    sq_norm = float(np.trace(gram))
    with _small_step(m):
        factor, piv, rank, info = lapack.dpstrf(gram, lower=0, tol=-1.0)
    if info < 0:
        raise ValueError(f"LAPACK dpstrf rejected its argument {-info}.")
    perm = piv[:m].astype(np.int64) - 1
    U = np.triu(factor[:rank])
    sq_tail = np.empty(m + 1)
    sq_tail[0] = sq_norm
    sq_tail[1 : rank + 1] = sq_norm - np.cumsum(np.einsum("ij,ij->i", U, U))
    sq_tail[rank + 1 :] = sq_tail[rank]
    return PivotedFactorization(perm, U, sq_norm, _relative_errors(sq_tail, sq_norm), rank)


def factorize_triangular(R: np.ndarray, dtype_eps: float) -> PivotedFactorization:
    """Column-pivoted QR (geqp3) of a triangular factor R (p × m) of the data."""
    R = np.asarray(R, dtype=np.float64)
    if not np.isfinite(R).all():
        raise ValueError("The data contain NaN or infinite values; remove or impute them.")
    p, m = R.shape
    with _small_step(m):
        U, perm = scipy.linalg.qr(R, mode="r", pivoting=True, check_finite=False)
    U = U[: min(p, m)]
    row_sq = np.einsum("ij,ij->i", U, U)
    sq_norm = float(row_sq.sum())
    sq_tail = np.zeros(m + 1)
    sq_tail[: row_sq.size] = np.cumsum(row_sq[::-1])[::-1]
    diag = np.abs(np.diag(U))
    cutoff = diag[0] * max(p, m) * dtype_eps if diag.size else 0.0
    trusted = int(np.count_nonzero(diag > cutoff)) if diag.size and diag[0] > 0 else 0
    return PivotedFactorization(
        perm.astype(np.int64), U, sq_norm, _relative_errors(sq_tail, sq_norm), trusted
    )


class GramAccumulator:
    """Streams row blocks of X into ``XᵀX`` (summed in float64, on the blocks' own device).

    Memory is m × m whatever the number of rows.

    Parameters
    ----------
    precision : {"float64", "native"}
        ``"float64"``: each sub-block is upcast and multiplied in float64 (never the whole
        matrix at once). ``"native"``: float32 (and half) blocks are multiplied in float32 over
        ``_NATIVE_BLOCK_ROWS`` rows at a time and summed in float64 — twice as fast, reliable
        for relative errors down to :data:`FLOAT32_GRAM_RELIABLE_ERROR`.
    """

    def __init__(self, precision: str = "float64"):
        self.precision = precision
        self.gram = None
        self.n_samples = 0
        self.n_features = None

    def update(self, X) -> GramAccumulator:
        """Add the rows of the 2-D array ``X`` (NumPy, CuPy or torch) to the statistic."""
        X = _check_block(X, self.n_features)
        if self.gram is None:
            self.n_features = X.shape[1]
            self.gram = _array.zeros((X.shape[1], X.shape[1]), X, "float64")
        dtype = "float64" if self.precision == "float64" else _array.float_dtype_for(X)
        if dtype == "float32" and not _array.exact_float32_matmul(X):
            dtype = "float64"  # TF32/bf16 products would lose the digits the ID needs
        if dtype == "float64" and _array.dtype_name(X) == "float64":
            self.gram += X.T @ X  # nothing to upcast: one product, no block copies
            self.n_samples += X.shape[0]
            return self
        max_elements = _BLOCK_ELEMENTS if dtype == "float64" else _NATIVE_BLOCK_ROWS * X.shape[1]
        for rows in row_blocks(X.shape[0], X.shape[1], max_elements):
            block = _array.astype(X[rows], dtype)
            self.gram += _array.astype(block.T @ block, "float64")
        self.n_samples += X.shape[0]
        return self

    def merge(self, other: GramAccumulator) -> GramAccumulator:
        """Add the rows accumulated by ``other`` (a sum: Grams of row blocks add up)."""
        if other.gram is None:
            return self
        _check_block(other.gram, self.n_features)
        if self.gram is None:
            self.n_features = other.n_features
            self.gram = other.gram.copy()
        else:
            self.gram += other.gram
        self.n_samples += other.n_samples
        return self

    def factorize(self) -> PivotedFactorization:
        """The pivoted Cholesky factorization of the accumulated Gram matrix (on the host)."""
        if self.gram is None:
            raise ValueError("No data has been accumulated yet.")
        return factorize_gram(_array.to_numpy(self.gram))


class QRAccumulator:
    """Streams row blocks of X into the R factor of a tall-skinny QR, in the data's dtype."""

    def __init__(self):
        self.R = None
        self.n_samples = 0
        self.n_features = None
        self.dtype = None

    def update(self, X) -> QRAccumulator:
        """Fold the rows of the 2-D array ``X`` into R (at most m × m)."""
        X = _check_block(X, self.n_features)
        if self.R is None:
            self.n_features = X.shape[1]
            self.dtype = _array.float_dtype_for(X)
        for rows in row_blocks(X.shape[0], X.shape[1]):
            block = _array.astype(X[rows], self.dtype)
            stacked = block if self.R is None else _array.vstack([self.R, block], like=block)
            self.R = _array.qr_r(stacked)
        self.n_samples += X.shape[0]
        return self

    def merge(self, other: QRAccumulator) -> QRAccumulator:
        """Fold in the rows accumulated by ``other``: R of its R stacked under ours."""
        if other.R is None:
            return self
        _check_block(other.R, self.n_features)
        if self.R is None:
            self.n_features, self.dtype = other.n_features, other.dtype
            self.R = other.R
        else:
            self.R = _array.qr_r(_array.vstack([self.R, other.R], like=self.R))
        self.n_samples += other.n_samples
        return self

    def factorize(self) -> PivotedFactorization:
        """Column-pivoted QR of the accumulated R factor (on the host)."""
        if self.R is None:
            raise ValueError("No data has been accumulated yet.")
        eps = float(np.finfo(self.dtype).eps)
        return factorize_triangular(_array.to_numpy(self.R), eps)


def _check_block(X, n_features):
    if X.ndim != 2:
        raise ValueError(f"Expected a 2-D block of rows, got an array of shape {tuple(X.shape)}.")
    if n_features is not None and X.shape[1] != n_features:
        raise ValueError(
            f"This block has {X.shape[1]} columns; earlier blocks had {n_features}."
        )
    return X


def randomized_factorization(X, k: int, rng: np.random.Generator, oversample: int = 10):
    """Columns from a Gaussian sketch, then the exact least-squares T from a second pass.

    Returns ``(selected, T, error)``. The sketch ``Y = Ω X`` ((k + oversample) × m) is pivoted
    by geqp3; T solves ``min ‖X − X[:, J] T‖_F`` through the normal equations
    ``(X_Jᵀ X_J) T = X_Jᵀ X`` accumulated block by block (a T read off the sketch alone is
    about twice as far from X). Two passes, ``O(n m (k + oversample) + n m k)`` work.
    """
    n, m = X.shape
    dtype = _array.float_dtype_for(X)
    n_sketch = min(k + oversample, n)
    sketch = np.zeros((n_sketch, m))
    for rows in row_blocks(n, m):
        block = _array.astype(X[rows], dtype)
        omega = rng.standard_normal((n_sketch, block.shape[0]), dtype=np.float32)
        sketch += _array.to_numpy(_array.from_numpy(omega, block, dtype) @ block)
    if not np.isfinite(sketch).all():
        raise ValueError("The data contain NaN or infinite values; remove or impute them.")
    with _small_step(m):
        _, piv = scipy.linalg.qr(sketch, mode="r", pivoting=True, check_finite=False)
    selected = piv[:k].astype(np.int64)
    cross, sq_norm = _cross_products(X, selected)
    T = _normal_equations(cross, selected)
    sq_err = max(sq_norm - float(np.vdot(cross, T)), 0.0)
    error = math.sqrt(sq_err / sq_norm) if sq_norm > 0 else 0.0
    return selected, T, error


def _cross_products(X, selected):
    """``X_Jᵀ X`` (k × m, float64) and ``‖X‖_F²`` in one pass over row blocks."""
    n, m = X.shape
    cross = None
    sq_norm = 0.0
    for rows in row_blocks(n, m):
        block = _array.astype(X[rows], "float64")
        part = block[:, _array.from_numpy(selected, block)].T @ block
        cross = part if cross is None else cross + part
        sq_norm += _array.frob_norm(block) ** 2
    return _array.to_numpy(cross), sq_norm


def _normal_equations(cross, selected):
    """Solve ``G_JJ T = X_Jᵀ X`` and make T exactly the identity on the selected columns."""
    gram_jj = cross[:, selected]
    try:
        T = scipy.linalg.solve(gram_jj, cross, assume_a="pos", check_finite=False)
    except (np.linalg.LinAlgError, ValueError):
        T = scipy.linalg.pinvh(gram_jj) @ cross
    T[:, selected] = np.eye(selected.size)
    return T
