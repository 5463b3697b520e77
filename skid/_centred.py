"""Centred corrective statistics: the fit with a constant column (``fit_intercept``).

The least-squares fit ``Z_o ≈ Z_c[:, J] T + 1 bᵀ`` is the fit of the centred blocks
``Z_c − 1 μ_cᵀ`` and ``Z_o − 1 μ_oᵀ``, with ``b = μ_o − Tᵀ μ_c[J]``. From the Gram route's sums
the centred statistics are a rank-one correction; from the TSQR factor of ``[1 | Z_c | Z_o]``
they are the factor itself without its first row and column (no subtraction). The errors stay
relative to the uncentred ``‖Z_o‖_F`` through ``scale``. Used by
:class:`skid._corrective.CrossAccumulator`.
"""

from __future__ import annotations

import numpy as np

from . import _array

__all__ = ["centred_gram", "centred_triangular", "column_sums", "ones_like"]


def centred_gram(gram, cross, sq_norm, sq_cols, sums, n):
    """``(G, C, ‖Z_o‖², per-column ‖Z_o[:, j]‖², (μ_c, μ_o), scale)`` of the centred blocks,
    from the Gram route's sums over ``n`` rows (``sums``: the column sums of Z_c and Z_o)."""
    mean_c, mean_o = (np.asarray(_array.to_numpy(v), dtype=np.float64) / n for v in sums)
    centred = sq_norm - n * float(mean_o @ mean_o)
    scale = float(np.sqrt(max(centred, 0.0) / sq_norm)) if sq_norm > 0 else 1.0
    return (gram - n * np.outer(mean_c, mean_c), cross - n * np.outer(mean_c, mean_o),
            max(centred, 0.0), np.maximum(sq_cols - n * mean_o**2, 0.0), (mean_c, mean_o),
            scale)


def centred_triangular(R, m):
    """``(R of the centred [Z_c | Z_o], (μ_c, μ_o), scale)`` from the TSQR factor ``R`` of
    ``[1 | Z_c | Z_o]`` (``m`` columns each): its first row is ``√n (1, μ_cᵀ, μ_oᵀ)``."""
    total = float(np.sum(R[:, 1 + m:] ** 2))
    means = (R[0, 1:m + 1] / R[0, 0], R[0, m + 1:] / R[0, 0])
    rest = R[1:, 1:]
    centred = float(np.sum(rest[:, m:] ** 2))
    return rest, means, float(np.sqrt(centred / total)) if total > 0 else 1.0


def column_sums(A):
    """Column sums in float64, on the block's device."""
    if _array.array_kind(A) == "torch":
        import torch

        return A.detach().sum(0, dtype=torch.float64)
    return A.sum(0, dtype=np.float64)


def ones_like(A):
    """One column of ones of ``A``'s kind, dtype and device."""
    if _array.array_kind(A) == "torch":
        import torch

        return torch.ones_like(A[:, :1])
    return _array.array_namespace(A).ones_like(A[:, :1])
