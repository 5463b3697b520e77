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

The package, one job per module (their public names re-exported here, so
``from skid._linalg import X`` keeps working; a test that shrinks a block size patches
:mod:`._blocking`):

* :mod:`._factorization`: :class:`PivotedFactorization`, what every route returns;
* :mod:`._cholesky`: pivoted Cholesky of a Gram (:func:`factorize_gram`);
* :mod:`._leading`: its leading pivots only, for a width rule known in advance;
* :mod:`._gram`: :class:`GramAccumulator`, the Gram streamed into a packed triangle;
* :mod:`._tsqr`: :class:`QRAccumulator` and :func:`factorize_triangular`;
* :mod:`._outputs`: :func:`factorize_for_outputs`, pivots by a consumer's output error;
* :mod:`._block_pivoting`: :class:`BlockPivotedFactorization`, whole column blocks (heads);
* :mod:`._randomized`: :func:`randomized_factorization`;
* :mod:`._blocking` (row blocks, column steps, exact scaling) and :mod:`._threads` (one BLAS
  thread for small steps), which the others share.
"""


from __future__ import annotations

# The package's names, and the helpers its modules share (public in the module that holds
# them); a module-private helper is reached in its own module (tests: ``_linalg._gram``).
# ruff: noqa: F401
from .. import _array, _policy

# Where each route stops resolving errors is a rule of the policy (re-exported here).
from .._policy import FLOAT32_GRAM_RELIABLE_ERROR, GRAM_RELIABLE_ERROR
from ._block_pivoting import BlockPivotedFactorization
from ._blocking import (
    BLOCK_ELEMENTS,
    NATIVE_BLOCK_ROWS,
    TRIANGLE_STEP,
    NonFiniteDataError,
    binary_exponent,
    check_block,
    non_finite_data,
    quiet,
    row_blocks,
    scale_block,
)
from ._cholesky import factorize_gram
from ._factorization import PivotedFactorization, ldexp_inf, relative_errors
from ._gram import GramAccumulator, triangle_size
from ._outputs import factorize_for_outputs
from ._psd import least_squares_fold, pinvh_solve
from ._randomized import randomized_factorization
from ._threads import one_blas_thread, small_step
from ._tsqr import QRAccumulator, factorize_triangular

__all__ = [
    "FLOAT32_GRAM_RELIABLE_ERROR",
    "GRAM_RELIABLE_ERROR",
    "BlockPivotedFactorization",
    "GramAccumulator",
    "NonFiniteDataError",
    "PivotedFactorization",
    "QRAccumulator",
    "factorize_for_outputs",
    "factorize_gram",
    "factorize_triangular",
    "least_squares_fold",
    "pinvh_solve",
    "randomized_factorization",
    "row_blocks",
    "triangle_size",
]
