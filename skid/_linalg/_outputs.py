"""Output-aware selection: re-pivot a factorization by the error of a consumer's outputs."""

from __future__ import annotations

import numpy as np
import scipy.linalg

from ._factorization import PivotedFactorization, relative_errors
from ._nogil import dpstrf
from ._threads import small_step


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
    return PivotedFactorization(order, U, sq_norm, relative_errors(sq_tail, sq_norm), rank,
                                fac.n_samples, fac.float32_products)


def _pivots(gram):
    """Pivot order and rank of LAPACK's pivoted Cholesky."""
    m = gram.shape[0]
    with small_step(m):
        _, piv, rank, info = dpstrf(np.array(gram, dtype=np.float64, order="F"), lower=False,
                                    tol=-1.0)
    if info < 0:
        raise ValueError(f"LAPACK dpstrf rejected its argument {-info}.")
    return piv[:m].astype(np.int64) - 1, int(rank)


def _output_greedy_order(gram, weight_gram, cutoff):
    """Greedy pivots by output error removed: ``(S G_W S)_jj / S_jj`` for the residual S."""
    S = gram.copy()
    m = S.shape[0]
    gain = np.einsum("ij,ji->i", S, weight_gram @ S)
    order, free = [], np.ones(m, dtype=bool)
    with small_step(m):
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
        with small_step(m):
            U11 = scipy.linalg.cholesky(g[:rank, :rank], lower=False, check_finite=False)
            U[:, :rank] = U11
            U[:, rank:] = scipy.linalg.solve_triangular(
                U11, g[:rank, rank:], trans="T", check_finite=False
            )
    return U
