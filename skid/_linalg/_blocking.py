"""How the core cuts its work, and keeps each piece in range: row blocks of the data, column
steps of the m × m loops, exact power-of-two scaling, the shape check of a block, the error
for non-finite data, and which layouts BLAS reads in place. The sizes are read through this
module (``_blocking.NAME``), so a test can shrink them in one place."""

from __future__ import annotations

import math

import numpy as np

#: Rows per block of float32 products (the ``"native"`` Gram's).
NATIVE_BLOCK_ROWS = 4096

#: Most rows per block of float32 products read in place (float32 data that BLAS reads
#: as they are: no copy, so a longer block costs no memory), cut into equal blocks. Fewer
#: float32 → float64 additions and product calls: 1.02–1.06× one ``X.T @ X`` instead of 1.11×
#: at 20,000 × 256; the float32 Gram's relative rounding grows 1.3–1.4× over 4,096-row blocks
#: (measured: 1.0e-7 against 7.1e-8 at 20,000 × 256, 6.5e-8 against 5.2e-8 at 100,000 × 512).
NATIVE_VIEW_ROWS = 16384

#: Entries per block of float64 rows (upcast or scaled copies): about 32 MB.
BLOCK_ELEMENTS = 1 << 22

#: Columns per panel of the Gram's stored triangle (and per step of the other m × m loops):
#: temporaries of m × 256.
TRIANGLE_STEP = 256

#: Square blocks of an m × m transposing copy (measured at m = 1,536: 128 the fastest of
#: 64 to 512).
MIRROR_STEP = 128


def product_step(m: int) -> int:
    """Rows of G per product where torch multiplies the square of an m-wide triangle's
    256-wide panel on the CPU (on several threads; one thread goes through NumPy's BLAS, see
    ``_gram._product_step``): each step's rows only up to their own last column (written in
    place into the panel), so less of the square is multiplied than in one product per
    panel; the panel's rows left of its square are one product. Measured (torch 2.13,
    float32, one thread, 1,460–2,048 rows, the left rows in steps too): 0.71× the panel
    products' time at m = 256, 0.82× at 384 and 0.80× at 96 with 64-row steps; 0.87–0.97× at
    512–1,536 with 128-row steps (64 there: 0.90–1.03×). The left rows in one product instead
    of steps (the same entries): 0.91–0.97× the products' time at m = 1,536, 0.95–1.03× at
    384–1,024 (two threads, 1,553 and 4,096 rows, three runs of ``benchmarks/bench_gram.py
    --left-rows --threads 2``); 0.85–0.88× at 1,024–1,536 while the shared machine ran slow."""
    return 64 if m <= 512 else 128


def leading_dimension(a) -> int | None:
    """The leading dimension with which BLAS reads the 2-D NumPy array ``a`` in place as a
    column-major matrix (unit row stride, a column stride of whole elements and at least the
    rows), else None. ``a.T`` answers for the row-major reading. The stride of an axis of
    length one is never followed, so it does not count (as for NumPy's contiguity flags): a
    single column is read with the rows as its leading dimension, a single row with any
    row stride."""
    size, (rows, columns) = a.itemsize, a.shape
    rows_step, column_step = a.strides
    if rows > 1 and rows_step != size:
        return None
    if columns <= 1:
        return max(rows, 1)
    if column_step % size or column_step < max(rows, 1) * size:
        return None
    return column_step // size


def row_blocks(n_rows: int, n_cols: int, max_elements: int | None = None):
    """Slices that cut ``n_rows`` rows into blocks of at most ``max_elements`` entries
    (default ``BLOCK_ELEMENTS``)."""
    max_elements = BLOCK_ELEMENTS if max_elements is None else max_elements
    step = max(1, max_elements // max(n_cols, 1))
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))


def binary_exponent(value: float) -> int:
    """``e`` with ``value / 2**e`` in [0.5, 1) (0 for 0): scaling by it is exact."""
    return math.frexp(value)[1] if value > 0 else 0


class NonFiniteDataError(ValueError):
    """A block of rows holds NaN or infinite values (the statistic was left untouched)."""


def non_finite_data() -> NonFiniteDataError:
    return NonFiniteDataError(
        "The data contain NaN or infinite values (the statistics of the rows would be "
        "non-finite); remove or impute those entries."
    )


def quiet():
    """NumPy's overflow/underflow warnings off: the callers check the results themselves."""
    return np.errstate(over="ignore", under="ignore", invalid="ignore")


def scale_block(block, exp: int):
    """``block / 2**exp`` in the block's own dtype, in two exact steps (float32-safe)."""
    if exp == 0:
        return block
    half = exp // 2
    with quiet():
        return block * math.ldexp(1.0, -half) * math.ldexp(1.0, half - exp)


def check_block(X, n_features):
    if X.ndim != 2:
        raise ValueError(f"Expected a 2-D block of rows, got an array of shape {tuple(X.shape)}.")
    if n_features is not None and X.shape[1] != n_features:
        raise ValueError(
            f"This block has {X.shape[1]} columns; earlier blocks had {n_features}."
        )
    return X
