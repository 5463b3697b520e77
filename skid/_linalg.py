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

_TRIANGLE_STEP = 256  # columns per step of the in-place m × m loops (temporaries of m × 256)


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


def _symmetrize(a) -> None:
    """Copy the upper triangle of the square array ``a`` (NumPy or torch) onto its lower one,
    in place."""
    m = a.shape[0]
    is_torch = _array.array_kind(a) == "torch"
    for start in range(0, m, _TRIANGLE_STEP):
        stop = min(start + _TRIANGLE_STEP, m)
        a[stop:, start:stop] = a[start:stop, stop:].T
        diag = a[start:stop, start:stop]
        if is_torch:
            diag.copy_(diag.triu() + diag.triu(1).T)
        else:
            diag[...] = np.triu(diag) + np.triu(diag, 1).T


def _torch_upper_product(block):
    """The upper triangle of ``blockᵀ block`` (a torch tensor; lower triangle 0), by column
    blocks: about 9/16 of a full product's flops, run on torch's own threads and device.
    (Handing CPU tensors to NumPy's ``syrk`` instead is faster on one thread, but OpenBLAS's
    threads then spin against torch's between the two: measured slower on two.)"""
    m = block.shape[1]
    step = max(_TRIANGLE_STEP, -(-m // 8))
    if m <= step:
        return block.T @ block
    out = block.new_zeros((m, m))
    for start in range(0, m, step):
        stop = min(start + step, m)
        out[:stop, start:stop] = block[:, :stop].T @ block[:, start:stop]
    return out


def _add_into(total: np.ndarray, part: np.ndarray, factor: float = 1.0, upper: bool = True):
    """``total += factor * part`` in place (``total`` float64 NumPy; only the upper triangle
    with ``upper``), by column blocks: a float32 ``part`` is cast in the ufunc's buffer, and a
    scaled one in float64 (in float32 small entries would underflow), never in an m × m
    temporary."""
    m = total.shape[0]
    for start in range(0, m, _TRIANGLE_STEP):
        stop = min(start + _TRIANGLE_STEP, m)
        rows = slice(0, stop if upper else m)
        out, piece = total[rows, start:stop], part[rows, start:stop]
        if factor != 1.0:
            piece = np.multiply(piece, factor, dtype=np.float64)
        np.add(out, piece, out=out)


def _syrk(block: np.ndarray, out: np.ndarray | None = None, beta: float = 0.0):
    """The upper triangle of ``blockᵀ block`` (+ ``beta · out``) by BLAS ``?syrk`` (half the
    flops of a full product), written into ``out`` (Fortran-ordered, of the block's dtype; a
    new zeroed one when None: its lower triangle stays 0). None for a block that is neither C-
    nor F-contiguous, which SciPy's wrapper would copy.
    """
    if block.flags.c_contiguous:  # blockᵀ is a Fortran-ordered m × n array a: a aᵀ
        a, trans = block.T, 0
    elif block.flags.f_contiguous:  # a = block itself: aᵀ a
        a, trans = block, 1
    else:
        return None
    if out is None:
        out = np.zeros((block.shape[1], block.shape[1]), dtype=block.dtype, order="F")
    syrk = scipy.linalg.blas.dsyrk if block.dtype == np.float64 else scipy.linalg.blas.ssyrk
    return syrk(1.0, a, beta=beta, c=out, trans=trans, lower=0, overwrite_c=1)


class GramAccumulator:
    """Streams row blocks of X into ``XᵀX`` (summed in float64, on the blocks' own device).

    Memory is m × m whatever the number of rows: the float64 statistic plus one block's
    product in its product dtype, added in place. Each block's product is checked before it
    is added: a block with NaN/Inf raises and leaves the statistic as it was, and a block
    whose squares would overflow, or underflow into lost digits, is divided by a power of two
    first (exact). The statistic is kept as ``gram = XᵀX / 4**scale_exp`` (``scale_exp`` is 0
    unless some block needed scaling); every result of the ID is scale-free.

    NumPy blocks are multiplied by BLAS ``?syrk``, which computes only the upper triangle (half
    the flops of a full product); :meth:`factorize` reads only that triangle, and reading
    :attr:`gram` fills in the lower one, in place. Torch and CuPy blocks are multiplied in full.

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
        self._gram = None
        self._upper = False  # only the upper triangle of _gram is valid
        self.n_samples = 0
        self.n_features = None
        self.scale_exp = 0
        self.float32_products = False

    @property
    def gram(self):
        """The statistic ``XᵀX / 4**scale_exp`` (float64, m × m, symmetric; None before any
        rows). Reading it fills the lower triangle from the upper one in place (no copy)."""
        if self._upper:
            _symmetrize(self._gram)
            self._upper = False
        return self._gram

    @gram.setter
    def gram(self, value) -> None:  # a whole symmetric statistic (e.g. summed over the ranks)
        self._gram, self._upper = value, False

    def update(self, X) -> GramAccumulator:
        """Add the rows of the 2-D array ``X`` (NumPy, CuPy or torch) to the statistic."""
        X = _check_block(X, self.n_features)
        dtype = "float64" if self.precision == "float64" else _array.float_dtype_for(X)
        if dtype == "float32" and not _array.exact_float32_matmul(X):
            dtype = "float64"  # TF32/bf16 products would lose the digits the ID needs
        with _quiet():  # overflow and underflow are checked and handled below
            part, upper = self._product(X, dtype, 0)
        low, high = _GRAM_SAFE[dtype]
        largest = _array.max_diagonal(part)
        if not low <= largest <= high:  # NaN fails too
            amax = _array.max_abs(X)
            if not math.isfinite(amax):
                raise _non_finite_data()
            exp = _exponent(amax)
            if amax > 0:
                with _quiet():  # underflow of entries far below the largest one is harmless
                    part, upper = self._product(X, dtype, exp)
        else:
            exp = 0
        self._add(part, upper, exp)
        self.n_features = X.shape[1]
        self.float32_products |= dtype == "float32"
        self.n_samples += X.shape[0]
        return self

    def merge(self, other: GramAccumulator) -> GramAccumulator:
        """Add the rows accumulated by ``other`` (a sum: Grams of row blocks add up; the two
        scales are reconciled as for a new block). ``other`` is not modified."""
        if other._gram is None:
            return self
        _check_block(other._gram, self.n_features)
        self.n_features = other.n_features
        self._add(other._gram, other._upper, other.scale_exp, copy=True)
        self.n_samples += other.n_samples
        self.float32_products = self.float32_products or other.float32_products
        return self

    def _add(self, part, upper: bool, exp: int, copy: bool = False) -> None:
        """Add ``part``, a Gram divided by ``4**exp`` (only its upper triangle valid when
        ``upper``), in place, rescaling the smaller of the two; ``part`` becomes the statistic
        when there is none yet (a copy of it with ``copy``)."""
        if self._gram is None:
            if isinstance(part, np.ndarray):  # "K": a Fortran-ordered part stays so, for LAPACK
                part = part.astype(np.float64, order="K", copy=copy)
            elif _array.array_kind(part) == "torch":
                double = part.double()  # itself when it is float64 already
                part = double.clone() if copy and double is part else double
            elif copy:
                part = part.copy()
            self._gram, self._upper, self.scale_exp = part, upper, exp
            return
        factor = 1.0
        if exp > self.scale_exp:
            self._gram *= math.ldexp(1.0, 2 * (self.scale_exp - exp))
            self.scale_exp = exp
        elif exp < self.scale_exp:
            factor = math.ldexp(1.0, 2 * (exp - self.scale_exp))
        ours, theirs = _array.array_kind(self._gram), _array.array_kind(part)
        if ours != theirs and {ours, theirs} == {"numpy", "torch"}:  # merged from the other kind
            part = _array.from_numpy(part, like=self._gram) if ours == "torch" else (
                _array.to_numpy(part))
        kinds = {_array.array_kind(self._gram), _array.array_kind(part)}
        if kinds == {"numpy"}:
            self._upper = True  # a triangle is half the work, and no rounding asymmetry
            _add_into(self._gram, part, factor)
        elif kinds == {"torch"}:  # whole arrays: the statistic is upper-valid if either is
            self._upper = self._upper or upper
            self._gram.add_(part if factor == 1.0 else part.double() * factor)
        else:  # arrays of two kinds (e.g. a torch statistic and a NumPy one merged in)
            if upper:
                part = part.copy(order="K") if isinstance(part, np.ndarray) else part.clone()
                _symmetrize(part)
            self._gram += part * factor if factor != 1.0 else part

    def _product(self, X, dtype: str, exp: int):
        """``(X / 2**exp)ᵀ (X / 2**exp)`` from products in ``dtype``, and whether to read only
        its upper triangle (NumPy: the statistic then stays exactly symmetric).

        A NumPy X of one row block gives its product in ``dtype`` (cast into the float64
        statistic as it is added); of several, their products summed in a float64 array here,
        so that a bad block is caught before the statistic changes.
        """
        if _array.array_kind(X) == "torch":
            return self._torch_product(X, dtype, exp), True
        if not isinstance(X, np.ndarray) or not isinstance(self._gram, (np.ndarray, type(None))):
            return self._full_product(X, dtype, exp), False
        m = X.shape[1]
        if dtype == "float64" and X.dtype == np.float64 and exp == 0:
            slices = [slice(None)]  # nothing to upcast: one product, no block copies
        else:
            max_elements = _BLOCK_ELEMENTS if dtype == "float64" else _NATIVE_BLOCK_ROWS * m
            slices = list(row_blocks(X.shape[0], m, max_elements))
        total = None if len(slices) == 1 else np.zeros((m, m), order="F")
        scratch = None
        for rows in slices:
            block = _scale_block(X[rows].astype(dtype, copy=False), exp)
            if total is not None and dtype == "float64":
                if _syrk(block, out=total, beta=1.0) is not None:  # summed in place
                    continue
            product = _syrk(block, out=scratch)  # one float32 buffer for all the blocks
            if product is None:  # a strided view: the full product reads it in place
                product = block.T @ block
            else:
                scratch = product
            if total is None:
                return product, True
            _add_into(total, product)
        return total, True

    def _torch_product(self, X, dtype: str, exp: int):
        """The upper triangle of ``(X / 2**exp)ᵀ (X / 2**exp)`` for a torch X: in ``dtype``
        for one row block (cast into the float64 statistic as it is added), summed in float64
        over several (a bad block is caught before the statistic changes)."""
        max_elements = _BLOCK_ELEMENTS if dtype == "float64" else _NATIVE_BLOCK_ROWS * X.shape[1]
        slices = list(row_blocks(X.shape[0], X.shape[1], max_elements))
        total = None
        for rows in slices:
            block = _scale_block(_array.astype(X[rows], dtype), exp)
            product = _torch_upper_product(block)
            if len(slices) == 1:
                return product
            total = product.double() if total is None else total.add_(product)
        return total

    def _full_product(self, X, dtype: str, exp: int):
        """``(X / 2**exp)ᵀ (X / 2**exp)`` in float64 from full products in ``dtype`` (any kind
        of array, on its device)."""
        if dtype == "float64" and _array.dtype_name(X) == "float64" and exp == 0:
            return X.T @ X  # nothing to upcast: one product, no block copies
        max_elements = _BLOCK_ELEMENTS if dtype == "float64" else _NATIVE_BLOCK_ROWS * X.shape[1]
        part = None
        for rows in row_blocks(X.shape[0], X.shape[1], max_elements):
            block = _scale_block(_array.astype(X[rows], dtype), exp)
            product = _array.astype(block.T @ block, "float64")
            if part is None:
                part = product
            else:
                part += product
        return part

    def factorize(self, consume: bool = False) -> PivotedFactorization:
        """The pivoted Cholesky factorization of the accumulated Gram matrix (on the host).

        Parameters
        ----------
        consume : bool
            Hand the statistic over: a host statistic is factorized in place (no m × m copy),
            and the accumulator is left empty, as new (also when the factorization raises).
            A caller that goes on accumulating must leave it False.

        Returns
        -------
        PivotedFactorization
        """
        if self._gram is None:
            raise ValueError("No data has been accumulated yet.")
        eps = float(np.finfo(np.float32).eps) if self.float32_products else None
        try:
            return factorize_gram(
                _array.to_numpy(self._gram), self.n_samples, eps, scale_exp=self.scale_exp,
                upper=self._upper, overwrite=consume,
            )  # fmt: skip
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
