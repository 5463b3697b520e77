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

from . import _array, _policy

# Where each route stops resolving errors is a rule of the policy (re-exported here).
from ._policy import FLOAT32_GRAM_RELIABLE_ERROR, GRAM_RELIABLE_ERROR  # noqa: F401

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
    """

    def __init__(
        self, perm, U, sq_norm, errors, trusted_rank, n_samples=None, float32_products=False
    ):
        self.perm = perm
        self.U = U
        self.sq_norm = sq_norm
        self.errors = errors
        self.trusted_rank = trusted_rank
        self.n_samples = n_samples
        self.float32_products = float32_products

    @property
    def n_features(self) -> int:
        return self.perm.shape[0]

    def rank_for_tol(self, tol: float) -> int:
        """Smallest k ≥ 1 whose relative error is at most ``tol`` (the policy's rule)."""
        return _policy.width_for_tol(self.errors, tol)

    def numerical_rank(self, rel_tol: float) -> int:
        """Number of pivots with ``|U_kk| > rel_tol · |U_00|`` (at least 1)."""
        diag = np.abs(np.diag(self.U[: self.trusted_rank]))
        if diag.size == 0 or diag[0] == 0:
            return 1
        return max(1, int(np.count_nonzero(diag > rel_tol * diag[0])))

    def gram(self) -> np.ndarray:
        """The Gram ``XᵀX`` (m × m, original column order) as the factor holds it (``UᵀU``)."""
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
        k_solve = min(k, self.trusted_rank)
        T = np.zeros((k, m))  # written in the original column order: no pivoted copy
        T[np.arange(k), self.perm[:k]] = 1.0
        if k_solve > 0 and k < m:
            with _small_step(m):
                T[:k_solve, self.perm[k:]] = scipy.linalg.solve_triangular(
                    self.U[:k_solve, :k_solve], self.U[:k_solve, k:], check_finite=False
                )
        return self.perm[:k].copy(), T



def factorize_for_outputs(fac: PivotedFactorization, weight_gram, how: str = "scaled"):
    """Re-pivot a factorization so the kept columns best reconstruct a consumer's outputs.

    With ``Z`` the data (the consumer's input) and ``W`` the consumer's weights, the output
    error of keeping columns ``J`` with the least-squares ``T`` is
    ``‖(Z − Z_J T) Wᵀ‖_F² = tr(W S_J Wᵀ)``, ``S_J`` the residual Gram. ``T`` stays the
    least-squares fit on ``Z``; only the order of the pivots changes, and ``errors`` become
    the relative output errors ``sqrt(tr(W S_J Wᵀ) / tr(W ZᵀZ Wᵀ))``.

    Parameters
    ----------
    fac : PivotedFactorization
        Of ``Z`` (its ``UᵀU`` is the Gram).
    weight_gram : ndarray of shape (m, m)
        ``WᵀW`` summed over the consumer's other axes (output channels, kernel positions).
    how : {"scaled", "greedy"}
        ``"scaled"``: pivoted Cholesky of ``D G D`` with ``D`` the consumer's column norms
        (one LAPACK call). ``"greedy"``: each step keeps the column that removes the most
        output error (``O(m²)`` per pivot).

    Returns
    -------
    PivotedFactorization
    """
    gram = fac.gram()
    m = gram.shape[0]
    weight_gram = np.asarray(weight_gram, dtype=np.float64)
    if weight_gram.shape != (m, m):
        raise ValueError(f"weight_gram must be {m} x {m}; got {weight_gram.shape}.")
    cutoff = np.finfo(np.float64).eps * m * max(float(np.trace(gram)), np.finfo(float).tiny)
    if how == "scaled":
        scale = np.sqrt(np.maximum(np.diag(weight_gram), 0.0))
        order, rank = _pivots(gram * np.outer(scale, scale))
    elif how == "greedy":
        order, rank = _output_greedy_order(gram, weight_gram, cutoff)
    else:
        raise ValueError(f"how must be 'scaled' or 'greedy'; got {how!r}.")
    rank = min(rank, fac.trusted_rank)
    U = _cholesky_in_order(gram, order, rank)
    gw = weight_gram[np.ix_(order, order)]
    per_row = ((U @ gw) * U).sum(axis=1)  # output energy each pivot explains
    sq_norm = float(np.einsum("ij,ji->", weight_gram, gram))
    sq_tail = np.zeros(m + 1)
    sq_tail[0] = sq_norm
    sq_tail[1 : rank + 1] = sq_norm - np.cumsum(per_row)
    return PivotedFactorization(order, U, sq_norm, _relative_errors(sq_tail, sq_norm), rank,
                                fac.n_samples, fac.float32_products)


def _pivots(gram):
    """Pivot order and rank of LAPACK's pivoted Cholesky."""
    m = gram.shape[0]
    with _small_step(m):
        _, piv, rank, info = lapack.dpstrf(gram, lower=0, tol=-1.0)
    if info < 0:
        raise ValueError(f"LAPACK dpstrf rejected its argument {-info}.")
    return piv[:m].astype(np.int64) - 1, int(rank)


def _output_greedy_order(gram, weight_gram, cutoff):
    """Greedy pivots by output error removed: ``(S G_W S)_jj / S_jj`` for the residual S."""
    S = gram.copy()
    m = S.shape[0]
    gain = np.einsum("ij,ji->i", S, weight_gram @ S)
    order, free = [], np.ones(m, dtype=bool)
    with _small_step(m):
        for _ in range(m):
            diag = np.diag(S)
            score = np.where(free & (diag > cutoff), gain / np.where(diag > 0, diag, 1), -1.0)
            p = int(np.argmax(score))
            if score[p] < 0:
                break
            s, sigma = S[:, p].copy(), diag[p]
            a = S @ (weight_gram @ s)
            gain += -2 * a * s / sigma + s * s * float(s @ weight_gram @ s) / sigma**2
            S -= np.outer(s, s) / sigma
            order.append(p)
            free[p] = False
    rank = len(order)
    rest = np.flatnonzero(free)
    return np.concatenate([np.asarray(order, dtype=np.int64), rest]), rank


def _cholesky_in_order(gram, order, rank):
    """Upper factor ``U`` (rank × m) with ``UᵀU = G[order][:, order]`` on the first ``rank``."""
    g = gram[np.ix_(order, order)]
    m = g.shape[0]
    U = np.zeros((rank, m))
    if rank:
        with _small_step(m):
            U11 = scipy.linalg.cholesky(g[:rank, :rank], lower=False, check_finite=False)
            U[:, :rank] = U11
            U[:, rank:] = scipy.linalg.solve_triangular(
                U11, g[:rank, rank:], trans="T", check_finite=False
            )
    return U


def _relative_errors(sq_tail: np.ndarray, sq_norm: float) -> np.ndarray:
    """Relative errors from the squared tail norms, made nonincreasing and ending at 0."""
    sq_tail = np.minimum.accumulate(np.maximum(sq_tail, 0.0))
    sq_tail[-1] = 0.0
    if sq_norm <= 0:
        return np.zeros_like(sq_tail)
    return np.sqrt(sq_tail / sq_norm)


def _exponent(value: float) -> int:
    """``e`` with ``value / 2**e`` in [0.5, 1) (0 for 0): scaling by it is exact."""
    return math.frexp(value)[1] if value > 0 else 0


class NonFiniteDataError(ValueError):
    """A block of rows holds NaN or infinite values (the statistic was left untouched)."""


def _non_finite_data() -> NonFiniteDataError:
    return NonFiniteDataError(
        "The data contain NaN or infinite values (the statistics of the rows would be "
        "non-finite); remove or impute those entries."
    )


def factorize_gram(
    gram: np.ndarray,
    n_samples: int | None = None,
    product_eps: float | None = None,
    *,
    scale_exp: int = 0,
    upper: bool = False,
    overwrite: bool = False,
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
    """
    gram = np.asarray(gram, dtype=np.float64)
    if not _finite(gram, upper):
        raise ValueError(
            "The statistics hold NaN or infinite values: the data (or the activations) "
            "contain NaN/Inf. Check the input for non-finite values."
        )
    m = gram.shape[0]
    diag_max = float(np.max(np.diagonal(gram), initial=0.0))
    shift = _exponent(diag_max) // 2 * 2  # even: U unscales by an exact power of two
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
    with _small_step(m):
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
    errors = _relative_errors(sq_tail, sq_norm)
    half = shift // 2 + scale_exp
    if half:
        np.ldexp(U, half, out=U)
    return PivotedFactorization(
        perm, U, _ldexp_inf(sq_norm, 2 * half), errors, rank, n_samples,
        float32_products=product_eps is not None,
    )  # fmt: skip


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
    shift = _exponent(float(np.max(np.abs(R), initial=0.0)))
    if shift:
        R = np.ldexp(R, -shift)
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
    if n_samples is not None:
        trusted = min(trusted, int(n_samples))
    errors = _relative_errors(sq_tail, sq_norm)
    shift += scale_exp
    return PivotedFactorization(
        perm.astype(np.int64), np.ldexp(U, shift), _ldexp_inf(sq_norm, 2 * shift), errors,
        trusted, n_samples,
    )  # fmt: skip


def _ldexp_inf(value: float, exp: int) -> float:
    """``value * 2**exp``, infinite past the float64 range."""
    try:
        return math.ldexp(value, exp)
    except OverflowError:
        return math.inf


def _quiet():
    """NumPy's overflow/underflow warnings off: the callers check the results themselves."""
    return np.errstate(over="ignore", under="ignore", invalid="ignore")


def _scale_block(block, exp: int):
    """``block / 2**exp`` in the block's own dtype, in two exact steps (float32-safe)."""
    if exp == 0:
        return block
    half = exp // 2
    with _quiet():
        return block * math.ldexp(1.0, -half) * math.ldexp(1.0, half - exp)


#: Squared magnitudes safe to sum in each product dtype (outside: scale the block first).
_GRAM_SAFE = {"float64": (2.0**-600, 2.0**1000), "float32": (2.0**-60, 2.0**100)}

#: Columns per panel of the Gram's stored triangle (and per step of the other m × m loops):
#: temporaries of m × 256.
_TRIANGLE_STEP = 256


def _finite(a: np.ndarray, upper: bool = False) -> bool:
    """Whether every entry of the square ``a`` (only its upper triangle with ``upper``) is
    finite, checked by column blocks (masks of m × 256, not m × m)."""
    m = a.shape[0]
    for start in range(0, m, _TRIANGLE_STEP):
        stop = min(start + _TRIANGLE_STEP, m)
        bad = ~np.isfinite(a[: stop if upper else m, start:stop])
        if (np.triu(bad, -start) if upper else bad).any():  # upper: rows i <= column j
            return False
    return True


def triangle_size(m: int) -> int:
    """Entries of the upper triangle of an m × m matrix, diagonal included."""
    return m * (m + 1) // 2


def _panel_bounds(m: int):
    """``(start, stop)`` of the column panels of an m × m triangle."""
    return [(start, min(start + _TRIANGLE_STEP, m)) for start in range(0, m, _TRIANGLE_STEP)]


def _panel_mask(width: int, stop: int, like):
    """Where a stored panel (``width × stop``: ``G[stop - width : stop, :stop]``) holds the
    upper triangle of G (row a: G's column ``stop - width + a``, rows up to it), as a boolean
    array of ``like``'s kind; in row-major order, these entries are LAPACK's packed storage."""
    start = stop - width
    mask = np.arange(stop)[None, :] <= np.arange(start, stop)[:, None]
    return _array.from_numpy(mask, like)


def _blas_readable(a) -> bool:
    """Whether BLAS reads the 2-D array in place (otherwise NumPy's matmul falls back to a
    loop without BLAS). Row slices of C- or F-ordered arrays are; torch and CuPy handle
    strides themselves."""
    if not isinstance(a, np.ndarray):
        return True
    (s0, s1), (n, m), size = a.strides, a.shape, a.itemsize
    return (s1 == size and s0 % size == 0 and s0 >= m * size) or (
        s0 == size and s1 % size == 0 and s1 >= n * size
    )


def _gram_slices(X, dtype: str, exp: int) -> list:
    """Row slices of X that :class:`GramAccumulator` multiplies one at a time."""
    n, m = X.shape
    if dtype == "float64" and _array.dtype_name(X) == "float64" and exp == 0 and (
        _blas_readable(X)
    ):
        return [slice(None)]  # nothing to upcast or scale: the products read X in place
    max_elements = _BLOCK_ELEMENTS if dtype == "float64" else _NATIVE_BLOCK_ROWS * m
    return list(row_blocks(n, m, max_elements))


def _gram_block(X, rows, dtype: str, exp: int):
    """``X[rows] / 2**exp`` in ``dtype``, laid out for BLAS."""
    block = _scale_block(_array.astype(X[rows], dtype), exp)
    return block if _blas_readable(block) else np.ascontiguousarray(block)


def _add_scaled(total, part, factor: float = 1.0) -> None:
    """``total += factor · part`` in place, ``total`` float64 (a float32 ``part`` is cast in
    the ufunc's buffer, and scaled in float64, where its small entries cannot underflow)."""
    if _array.array_kind(total) == "torch":
        total.add_(part, alpha=factor)  # computed in total's float64
    elif factor == 1.0:
        total += part
    else:
        total += _array.astype(part, "float64") * factor


def _as_kind(part, like):
    """``part`` in the library (and torch device) of ``like``."""
    kind = _array.array_kind(like)
    if _array.array_kind(part) == kind:
        return part.to(like.device) if kind == "torch" else part
    return _array.from_numpy(_array.to_numpy(part), like)


def _add_product(total, left, right, factor: float, scratch, capacity: int):
    """``total += factor · (left @ right)`` in place: the product in the operands' dtype and
    library, written into ``scratch`` (a flat buffer of that dtype, reused; None: one of
    ``capacity`` entries is made here), then added into the float64 ``total``. Returns the
    scratch buffer."""
    kind = _array.array_kind(left)
    size = total.shape[0] * total.shape[1]
    if kind != _array.array_kind(total):  # a statistic of another kind (merged in)
        _add_scaled(total, _as_kind(left @ right, total), factor)
    elif kind == "torch":
        import torch

        if left.dtype == total.dtype:  # float64 products: one GEMM, straight into the panel
            total.addmm_(left, right, alpha=factor)
            return scratch
        if scratch is None:
            scratch = left.new_empty(capacity)
        out = scratch[:size].view(total.shape)
        torch.mm(left, right, out=out)
        total.add_(out, alpha=factor)
    elif kind == "numpy":
        if scratch is None:
            scratch = np.empty(capacity, dtype=left.dtype)
        out = scratch[:size].reshape(total.shape)
        np.matmul(left, right, out=out)
        _add_scaled(total, out, factor)
    else:  # CuPy
        _add_scaled(total, left @ right, factor)
    return scratch


class GramAccumulator:
    """Streams row blocks of X into ``XᵀX`` (summed in float64, on the blocks' own device).

    Only the upper triangle is stored, as column panels ``_TRIANGLE_STEP`` (256) wide: panel
    p holds ``G[:stop_p, start_p:stop_p]``, column-major (kept as the C-ordered array of its
    transpose, ``G[start_p:stop_p, :stop_p]``: for NumPy, the Fortran-ordered panel), in
    float64 and in the blocks' own library and device — about ``m (m + 256) / 2`` entries
    instead of m², whatever the number of rows. A block adds one product per panel,
    ``block[:, :stop]ᵀ block[:, start:stop]`` (m × 256 at most), into that panel in place, so
    accumulating holds the statistic and one panel's product, never an m × m temporary.

    Each block is checked before anything is added, from its product's diagonal alone (its
    columns' sums of squares: ``|G_ij| ≤ sqrt(G_ii G_jj)``, so a finite diagonal in range
    means finite entries): a block with NaN/Inf raises and leaves the statistic as it was,
    and a block whose squares would overflow, or underflow into lost digits, is divided by a
    power of two first (exact). The statistic is kept as ``gram = XᵀX / 4**scale_exp``
    (``scale_exp`` is 0 unless some block needed scaling); every result of the ID is
    scale-free.

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
        self._clear()

    def _clear(self) -> None:
        self._panels = None  # the upper triangle, column panel by column panel
        self.n_samples = 0
        self.n_features = None
        self.scale_exp = 0
        self.float32_products = False

    @property
    def nbytes(self) -> int:
        """Bytes the statistic holds (0 before any rows)."""
        return sum(int(panel.nbytes) for panel in self._panels or ())

    def _like(self):
        """An array of the statistic's library and device."""
        return self._panels[0] if self._panels else np.zeros(0)

    @property
    def gram(self):
        """The statistic ``XᵀX / 4**scale_exp`` (float64, m × m, symmetric, in the statistic's
        library and device; None before any rows): a new array, built from the triangle."""
        if self._panels is None:
            return None
        m = self.n_features
        gram = _array.zeros((m, m), self._like(), "float64")
        for panel in self._panels:
            width, stop = panel.shape
            start = stop - width
            gram[start:stop, :start] = panel[:, :start]
            gram[:start, start:stop] = panel[:, :start].T
            square = panel[:, start:stop]  # its lower triangle is the upper one of G's
            gram[start:stop, start:stop] = _array.tril(square) + _array.tril(square, -1).T
        return gram

    def triangle(self):
        """The statistic's upper triangle in LAPACK's packed storage (column j's rows 0..j,
        columns in order): a new 1-D float64 array of ``triangle_size(m)`` entries in the
        statistic's library and device; None before any rows. What data-parallel ranks sum;
        :meth:`set_triangle` reads it back."""
        if self._panels is None:
            return None
        like = self._like()
        packed = _array.zeros((triangle_size(self.n_features),), like, "float64")
        for panel in self._panels:
            width, stop = panel.shape
            entries = slice(triangle_size(stop - width), triangle_size(stop))
            packed[entries] = panel[_panel_mask(width, stop, like)]
        return packed

    def set_triangle(self, values, n_features: int, scale_exp: int = 0) -> GramAccumulator:
        """Make the statistic the packed upper triangle ``values`` (as :meth:`triangle` gives
        it) of an ``n_features``-wide Gram divided by ``4**scale_exp``, kept in the library and
        on the device of ``values``; the old statistic is released first."""
        if tuple(values.shape) != (triangle_size(n_features),):
            raise ValueError(f"A packed {n_features} × {n_features} triangle has "
                             f"{triangle_size(n_features)} entries; got {tuple(values.shape)}.")
        values = _array.astype(values, "float64")
        self._panels = None
        panels = []
        for start, stop in _panel_bounds(n_features):
            panel = _array.zeros((stop - start, stop), values, "float64")
            panel[_panel_mask(stop - start, stop, values)] = values[
                triangle_size(start) : triangle_size(stop)
            ]
            panels.append(panel)
        self._panels, self.n_features, self.scale_exp = panels, n_features, scale_exp
        return self

    def update(self, X) -> GramAccumulator:
        """Add the rows of the 2-D array ``X`` (NumPy, CuPy or torch) to the statistic.

        Every row block's diagonal is checked before any product is added, so a bad block
        anywhere in X leaves the statistic as it was.
        """
        X = _check_block(X, self.n_features)
        if _array.array_kind(X) == "torch":
            X = X.detach()  # a statistic, not a graph (products into buffers refuse graphs)
        m = X.shape[1]
        dtype = "float64" if self.precision == "float64" else _array.float_dtype_for(X)
        if dtype == "float32" and not _array.exact_float32_matmul(X):
            dtype = "float64"  # TF32/bf16 products would lose the digits the ID needs
        slices = _gram_slices(X, dtype, 0)
        largest, block = 0.0, None
        with _quiet():  # overflow and underflow are checked and handled below
            for rows in slices:
                block = _gram_block(X, rows, dtype, 0)
                value = _array.max_column_sq_sum(block)  # the largest of blockᵀ block's diagonal
                if not value <= largest:  # larger, or NaN
                    largest = value
                if not math.isfinite(value):
                    break
        kept = block if len(slices) == 1 else None  # multiplied below without a second copy
        low, high = _GRAM_SAFE[dtype]
        exp = 0
        if not low <= largest <= high:  # NaN fails too
            amax = _array.max_abs(X)
            if not math.isfinite(amax):
                raise _non_finite_data()
            exp = _exponent(amax)  # 0 for zeros
            if exp:
                slices, kept = _gram_slices(X, dtype, exp), None
        if self._panels is None:
            self._panels = [_array.zeros((stop - start, stop), X, "float64")
                            for start, stop in _panel_bounds(m)]
            self.scale_exp = exp
        factor = self._reconcile(exp)
        scratch = None  # one buffer for every panel's product, of the largest one's size
        capacity = max((panel.shape[0] * panel.shape[1] for panel in self._panels), default=0)
        with _quiet():  # underflow of entries far below the largest one is harmless
            for rows in slices:
                block = kept if kept is not None else _gram_block(X, rows, dtype, exp)
                for panel in self._panels:
                    width, stop = panel.shape
                    scratch = _add_product(panel, block[:, stop - width : stop].T,
                                           block[:, :stop], factor, scratch, capacity)
        self.n_features = m
        self.float32_products |= dtype == "float32"
        self.n_samples += X.shape[0]
        return self

    def merge(self, other: GramAccumulator) -> GramAccumulator:
        """Add the rows accumulated by ``other`` (a sum: Grams of row blocks add up, panel by
        panel; the two scales are reconciled as for a new block). ``other`` is not modified."""
        if other._panels is None:
            return self
        if self.n_features is not None and other.n_features != self.n_features:
            raise ValueError(f"The merged statistic has {other.n_features} columns; this one "
                             f"has {self.n_features}.")
        if self._panels is None:
            self._panels = [_array.copy(panel) for panel in other._panels]
            self.scale_exp = other.scale_exp
        else:
            factor = self._reconcile(other.scale_exp)
            for ours, theirs in zip(self._panels, other._panels, strict=True):
                _add_scaled(ours, _as_kind(theirs, ours), factor)
        self.n_features = other.n_features
        self.n_samples += other.n_samples
        self.float32_products = self.float32_products or other.float32_products
        return self

    def _reconcile(self, exp: int) -> float:
        """Bring the statistic to the scale of a part divided by ``4**exp`` where that is the
        larger (exact: a power of two); returns the factor to add the part with."""
        if exp > self.scale_exp:
            for panel in self._panels:
                panel *= math.ldexp(1.0, 2 * (self.scale_exp - exp))
            self.scale_exp = exp
        return math.ldexp(1.0, 2 * (exp - self.scale_exp))

    def factorize(self, consume: bool = False) -> PivotedFactorization:
        """The pivoted Cholesky factorization of the accumulated Gram matrix (on the host).

        The triangle is copied into one new Fortran-ordered m × m float64 array, which LAPACK
        factorizes in place.

        Parameters
        ----------
        consume : bool
            Hand the statistic over: each panel is released as soon as it is copied (peak:
            the m × m array and one panel), and the accumulator is left empty, as new (also
            when the factorization raises). A caller that goes on accumulating must leave it
            False.

        Returns
        -------
        PivotedFactorization
        """
        if self._panels is None:
            raise ValueError("No data has been accumulated yet.")
        eps = float(np.finfo(np.float32).eps) if self.float32_products else None
        try:
            gram = np.zeros((self.n_features,) * 2, order="F")  # LAPACK reads its upper triangle
            for p, panel in enumerate(self._panels):
                width, stop = panel.shape
                gram[:stop, stop - width : stop] = _array.to_numpy(panel).T
                if consume:
                    self._panels[p] = None  # the loop's name holds it until the next panel
            panel = None
            return factorize_gram(
                gram, self.n_samples, eps, scale_exp=self.scale_exp, upper=True, overwrite=True
            )
        finally:
            if consume:
                self._clear()


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
        X = _check_block(X, self.n_features)
        dtype = self.dtype or _array.float_dtype_for(X)
        for rows in row_blocks(X.shape[0], X.shape[1]):
            block = _array.astype(X[rows], dtype)
            R = _folded(self.R, _scale_block(block, self.scale_exp))
            if R is None:  # overflow, or NaN/Inf in the block
                amax = _array.max_abs(block)
                if not math.isfinite(amax):
                    raise _non_finite_data()
                exp = max(_exponent(amax), self.scale_exp)
                previous = None if self.R is None else _scale_block(self.R, exp - self.scale_exp)
                R = _folded(previous, _scale_block(block, exp))
                if R is None:
                    raise _non_finite_data()
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
        _check_block(other.R, self.n_features)
        if self.R is None:
            self.n_features, self.dtype = other.n_features, other.dtype
            self.R, self.scale_exp = other.R, other.scale_exp
        else:
            exp = max(self.scale_exp, other.scale_exp)  # both R's at the larger scale
            ours = _scale_block(self.R, exp - self.scale_exp)
            theirs = _scale_block(other.R, exp - other.scale_exp)
            self.R = _array.qr_r(_array.vstack([ours, theirs], like=ours))
            self.scale_exp = exp
        self.n_samples += other.n_samples
        return self

    def factorize(self, consume: bool = False) -> PivotedFactorization:
        """Column-pivoted QR of the accumulated R factor (on the host).

        Parameters
        ----------
        consume : bool
            As in :meth:`GramAccumulator.factorize`, the accumulator is left empty (R, which
            merges may share, is still copied).

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
    with _quiet():
        new_R = _array.qr_r(stacked)
    return new_R if math.isfinite(_array.max_abs(new_R)) else None


def _check_block(X, n_features):
    if X.ndim != 2:
        raise ValueError(f"Expected a 2-D block of rows, got an array of shape {tuple(X.shape)}.")
    if n_features is not None and X.shape[1] != n_features:
        raise ValueError(
            f"This block has {X.shape[1]} columns; earlier blocks had {n_features}."
        )
    return X


#: Magnitudes of entries that sketch and sum safely in each dtype (outside: scale first).
_ENTRY_SAFE = {"float64": (2.0**-300, 2.0**450), "float32": (2.0**-30, 2.0**50)}


def _data_exponent(X, dtype: str) -> int:
    """0 for data of a safe magnitude for ``dtype``, else the exponent that scales it."""
    amax = _array.max_abs(X)
    if not math.isfinite(amax):
        raise _non_finite_data()
    low, high = _ENTRY_SAFE[dtype]
    return 0 if amax == 0 or low <= amax <= high else _exponent(amax)


def randomized_factorization(X, k: int, rng: np.random.Generator, oversample: int = 10):
    """Columns from a Gaussian sketch, then the exact least-squares T from a second pass.

    Returns ``(selected, T, error)``. The sketch ``Y = Ω X`` ((k + oversample) × m) is pivoted
    by geqp3; T solves ``min ‖X − X[:, J] T‖_F`` through the normal equations
    ``(X_Jᵀ X_J) T = X_Jᵀ X`` accumulated block by block (a T read off the sketch alone is
    about twice as far from X). Two passes, ``O(n m (k + oversample) + n m k)`` work. Data of
    extreme magnitude are scaled block by block by a power of two (nothing changes).
    """
    n, m = X.shape
    dtype = _array.float_dtype_for(X)
    exp = _data_exponent(X, dtype)
    n_sketch = min(k + oversample, n)
    sketch = np.zeros((n_sketch, m))
    for rows in row_blocks(n, m):
        block = _scale_block(_array.astype(X[rows], dtype), exp)
        omega = rng.standard_normal((n_sketch, block.shape[0]), dtype=np.float32)
        with _quiet():
            sketch += _array.to_numpy(_array.from_numpy(omega, block, dtype) @ block)
    if not np.isfinite(sketch).all():
        raise _non_finite_data()
    with _small_step(m):
        _, piv = scipy.linalg.qr(sketch, mode="r", pivoting=True, check_finite=False)
    selected = piv[:k].astype(np.int64)
    cross, sq_norm = _cross_products(X, selected, exp)
    T = _normal_equations(cross, selected)
    sq_err = max(sq_norm - float(np.vdot(cross, T)), 0.0)
    error = math.sqrt(sq_err / sq_norm) if sq_norm > 0 else 0.0
    return selected, T, error


def _cross_products(X, selected, exp=0):
    """``X_Jᵀ X`` (k × m, float64) and ``‖X‖_F²`` in one pass, of ``X / 2**exp``."""
    n, m = X.shape
    cross = None
    sq_norm = 0.0
    for rows in row_blocks(n, m):
        block = _scale_block(_array.astype(X[rows], "float64"), exp)
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


class BlockPivotedFactorization:
    """Greedy selection of whole column blocks (e.g. attention heads) from a Gram matrix.

    At each step the block whose columns remove the most of the residual squared norm is kept:
    with ``S`` the Schur complement of the kept columns in ``G = XᵀX`` (the Gram of the
    residual ``X − P_K X``), block ``b`` removes ``tr(S[:, b] S[b, b]⁺ S[b, :])``. The errors
    along the greedy order are exact for the nested selections, so one factorization gives the
    error for every number of kept blocks.

    Parameters
    ----------
    gram : ndarray of shape (m, m)
        ``XᵀX`` (float64).
    blocks : sequence of int arrays
        Column indices of each candidate block (disjoint, covering ``range(m)``).
    partition : sequence of int, optional
        A group label per block. When given, blocks are kept in rounds that take one block from
        every group, so after ``r`` rounds each group keeps ``r`` (grouped-query attention:
        the same number of query heads per key/value group).
    weight_gram : ndarray of shape (m, m), optional
        ``WᵀW`` of the consumer's weights: blocks are then kept by the output error they remove,
        ``tr(W S Wᵀ)``, and ``errors`` are relative output errors (``T`` stays the
        least-squares fit on ``X``).

    Attributes
    ----------
    order : ndarray of int
        Block indices in the order they were kept.
    errors : ndarray of shape (n_blocks + 1,)
        Relative Frobenius error ``‖X − X_K T‖_F / ‖X‖_F`` keeping the first k blocks of
        ``order``.
    """

    def __init__(self, gram, blocks, partition=None, weight_gram=None):
        gram = np.asarray(gram, dtype=np.float64)
        self.weight_gram = None if weight_gram is None else np.asarray(weight_gram, float)
        if not np.isfinite(gram).all():
            raise ValueError("The statistics hold NaN or infinite values; check the data.")
        self.gram = gram
        self.blocks = [np.asarray(b, dtype=np.int64) for b in blocks]
        covered = np.sort(np.concatenate(self.blocks)) if self.blocks else np.array([])
        if not np.array_equal(covered, np.arange(gram.shape[0])):
            raise ValueError("The blocks must partition the Gram's columns exactly once.")
        labels = np.zeros(len(self.blocks), int) if partition is None else np.asarray(partition)
        if labels.shape != (len(self.blocks),):
            raise ValueError(f"partition needs one label per block ({len(self.blocks)}).")
        self.order, self.errors = self._greedy(labels, partition is not None)

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    def _greedy(self, labels, rounds: bool):
        S = self.gram.copy()
        sq_norm = self._energy(S)
        scale = max(float(np.trace(S)), np.finfo(float).tiny)
        cutoff = np.finfo(np.float64).eps * S.shape[0] * scale
        remaining = list(range(self.n_blocks))
        order, sq_tail = [], [sq_norm]
        served = set()
        with _small_step(S.shape[0]):
            while remaining:
                if rounds and served >= {labels[b] for b in remaining}:
                    served = set()  # every group has had its turn this round
                eligible = [b for b in remaining if not rounds or labels[b] not in served]
                halves = [self._half(S, self.blocks[b], cutoff) for b in eligible]
                gains = [self._energy(h.T @ h) for h in halves]
                best_at = int(np.argmax(gains))
                best = eligible[best_at]
                S -= halves[best_at].T @ halves[best_at]
                order.append(best)
                remaining.remove(best)
                served.add(labels[best])
                sq_tail.append(self._energy(S))
        sq_tail = np.asarray(sq_tail)
        sq_tail[-1] = 0.0  # every column kept: nothing left, whatever the rounding says
        return np.asarray(order, dtype=np.int64), _relative_errors(sq_tail, sq_norm)

    def _energy(self, S) -> float:
        """``tr(S)``, or ``tr(W S Wᵀ)`` with consumer weights."""
        if self.weight_gram is None:
            return float(np.trace(S))
        return float(np.einsum("ij,ji->", self.weight_gram, S))

    @staticmethod
    def _half(S, cols, cutoff):
        """``S[b,b]^(-1/2) S[b, :]``: its squared norm is what keeping block ``b`` removes."""
        w, V = np.linalg.eigh(S[np.ix_(cols, cols)])
        keep = w > cutoff
        return (V[:, keep] / np.sqrt(w[keep])).T @ S[cols]

    def select(self, k: int):
        """The first ``k`` blocks: ``(blocks, columns, T)``, ``T`` of shape (len(columns), m).

        ``T`` is the least-squares fit ``min ‖X − X[:, columns] T‖_F`` from the Gram (the
        minimum-norm one where the kept columns are linearly dependent); ``X[:, columns] T``
        reconstructs every column.
        """
        if not 0 <= k <= self.n_blocks:
            raise ValueError(f"k must be in [0, {self.n_blocks}]; got {k}.")
        kept = self.order[:k]
        columns = np.concatenate([self.blocks[b] for b in kept]) if k else np.array([], int)
        if not k:
            return kept.copy(), columns, np.zeros((0, self.gram.shape[0]))
        with _small_step(self.gram.shape[0]):
            T = scipy.linalg.pinvh(self.gram[np.ix_(columns, columns)]) @ self.gram[columns]
        return kept.copy(), columns, T
