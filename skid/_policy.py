"""The rules shared by :class:`~skid.InterpolativeDecomposition` and ``NetworkCompressor``.

One place for every decision that turns a request (``tol``, ``rank``, a fraction of a width)
into a route over the data, and for the re-check that sends a result to a finer route when
the one that ran does not resolve it. Pure Python: no arrays are touched here.

Routes, coarse to fine, and the smallest relative ID error each resolves:

=================================  ==========================================
``("gram", "native")``             float32 products summed in float64: 1e-3
``("gram", "float64")``            float64 products: 1e-4
``("qr", ...)``                    TSQR, accurate to the data's rounding
=================================  ==========================================

(``"native"`` only differs from ``"float64"`` for float32 and half-precision data.)
"""

from __future__ import annotations

import math

import numpy as np

#: Relative errors below this are not resolved by the Gram route (it squares the condition
#: number); requests that land there use the QR route.
GRAM_RELIABLE_ERROR = 1e-4

#: Relative errors below this are not resolved by a Gram of float32 products (summed in
#: float64 over row blocks). Measured on 100,000 × 512 float32 data: the error estimate is
#: off by 5e-5 (relative) at 2e-2, 0.15 % at 2e-3, 1 % at 2e-4.
FLOAT32_GRAM_RELIABLE_ERROR = 1e-3

#: ``method="auto"`` sketches only when the rank is a small part of a wide matrix.
RANDOMIZED_MIN_FEATURES = 1024
RANDOMIZED_MAX_RANK_FRACTION = 1 / 8

_ROUNDING_SLACK = 1e-9  # ``0.28 * 25`` is 7.000000000000001: still 7 channels


def width_for_fraction(fraction: float, width: int) -> int:
    """``ceil(fraction * width)``, at least 1, ignoring rounding noise (0.28 of 25 is 7).

    >>> width_for_fraction(0.28, 25), width_for_fraction(0.1, 30), width_for_fraction(0.01, 8)
    (7, 3, 1)
    """
    return max(1, math.ceil(fraction * width - _ROUNDING_SLACK))


def widths_for_fraction(fraction: float, widths) -> np.ndarray:
    """:func:`width_for_fraction` of every width; int64 array."""
    widths = np.asarray(widths, dtype=np.int64)
    kept = np.ceil(fraction * widths.astype(float) - _ROUNDING_SLACK)
    return np.maximum(1, kept).astype(np.int64)


def width_for_tol(errors, tol: float) -> int:
    """Smallest width ``k >= 1`` with ``errors[k] <= tol`` (the full width when none is).

    ``errors[k]`` is the relative ID error keeping ``k`` columns, ``k = 0..m``.

    >>> width_for_tol([1.0, 0.5, 0.2, 0.0], 0.3), width_for_tol([1.0, 0.5, 0.2, 0.0], 0.0)
    (2, 3)
    """
    meets = np.flatnonzero(np.asarray(errors)[1:] <= tol)
    return int(meets[0]) + 1 if meets.size else len(errors) - 1


def exact_route(tol: float | None, *, numerical_rank: bool = False) -> str:
    """``"gram"`` or ``"qr"`` for a request: ``tol``, a width (``tol=None``), or neither.

    ``tol`` below :data:`GRAM_RELIABLE_ERROR` needs ``"qr"``; so does the numerical rank of
    float64 data (``numerical_rank=True``: it needs full accuracy). A width starts on
    ``"gram"``; :func:`finer_route` moves it when its error turns out to be too small.
    """
    if tol is not None:
        return "gram" if tol >= GRAM_RELIABLE_ERROR else "qr"
    return "qr" if numerical_rank else "gram"


def prefers_randomized(rank: int | None, n_features: int) -> bool:
    """A sketch pays off for a given rank that is a small part of many features."""
    return (
        rank is not None
        and n_features >= RANDOMIZED_MIN_FEATURES
        and rank <= n_features * RANDOMIZED_MAX_RANK_FRACTION
    )


def gram_precision(*, float32_data: bool, tol: float | None, width_request: bool) -> str:
    """``"native"`` (float32 products) when the error asked for is within their reach.

    A ``tol`` of at least :data:`FLOAT32_GRAM_RELIABLE_ERROR` is; a width request
    (``width_request``: a rank, a fraction or a FLOPs target, whose result can be re-checked)
    starts there too; the numerical rank and finer tolerances get float64 products.
    """
    if not float32_data:
        return "float64"
    if tol is not None:
        return "native" if tol >= FLOAT32_GRAM_RELIABLE_ERROR else "float64"
    return "native" if width_request else "float64"


def finer_route(fac, k: int, *, method: str, precision: str, auto: bool, width_request: bool):
    """The ``(method, precision)`` to recompute with, or None when width ``k`` is resolved.

    ``fac`` is the factorization the route ``(method, precision)`` produced (its ``errors``,
    ``trusted_rank``, ``n_features``, ``n_samples`` and ``float32_products``: ``"native"``
    on float64 data multiplies in float64). Width ``k`` is unresolved when

    * it goes past the pivots that are clear of the statistic's rounding
      (``k > trusted_rank``) while the rows seen would allow more: only a finer route tells
      whether the remaining columns are noise;
    * or, for a width request, its error is below what the route resolves (then T and the
      reported error are rounding; a ``tol`` request only needs ``errors[k] <= tol``).

    Float32 products → float64 products (whatever ``method`` asked for) → QR (only for
    ``method="auto"``, ``auto=True``; straight there for a width whose error is below
    :data:`GRAM_RELIABLE_ERROR`). Keeping every column (``k == n_features``) is exact on any
    route.
    """
    m = fac.n_features
    if method != "gram" or k >= m:
        return None
    rows = getattr(fac, "n_samples", None)
    limit = m if rows is None else min(rows, m)
    unresolved = k > fac.trusted_rank and fac.trusted_rank < limit
    error = float(fac.errors[k])
    below_gram = width_request and error < GRAM_RELIABLE_ERROR
    if auto and below_gram:
        return "qr", precision  # past both Gram routes: straight to QR, one pass
    float32_products = getattr(fac, "float32_products", True)
    if (
        precision == "native"
        and float32_products
        and (unresolved or (width_request and error < FLOAT32_GRAM_RELIABLE_ERROR))
    ):
        return "gram", "float64"
    if auto and unresolved:
        return "qr", precision
    return None
