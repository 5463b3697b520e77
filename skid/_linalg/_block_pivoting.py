"""Block pivoting: greedy selection of whole column blocks (attention heads) from a Gram."""

from __future__ import annotations

import numpy as np

from ._factorization import relative_errors
from ._psd import inverse_root_product, least_squares_fold
from ._threads import small_step


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
        # S is the Schur complement on the columns not kept yet (``alive``): the kept ones'
        # rows and columns are zero in exact arithmetic, so each step downdates and searches
        # only what is left (about a third of the flops of the m × m complement over a fit)
        S = self.gram.copy()
        alive = np.arange(S.shape[0])
        where = alive.copy()  # each column's position in S (where it is alive)
        weights = self.weight_gram  # WᵀW on S's columns
        sq_norm = self._energy(S, weights)
        scale = max(float(np.trace(S)), np.finfo(float).tiny)
        cutoff = np.finfo(np.float64).eps * S.shape[0] * scale
        remaining = list(range(self.n_blocks))
        order, sq_tail = [], [sq_norm]
        served = set()
        with small_step(S.shape[0]):
            while remaining:
                if len(remaining) == 1:  # the last block: every column kept, its error 0
                    order.append(remaining.pop())  # (below), with nothing to downdate
                    sq_tail.append(0.0)
                    break
                if rounds and served >= {labels[b] for b in remaining}:
                    served = set()  # every group has had its turn this round
                eligible = [b for b in remaining if not rounds or labels[b] not in served]
                halves = [self._half(S, where[self.blocks[b]], cutoff) for b in eligible]
                gains = [self._gain(h, weights) for h in halves]
                best_at = int(np.argmax(gains))
                best = eligible[best_at]
                left = np.ones(alive.size, dtype=bool)
                left[where[self.blocks[best]]] = False
                h = halves[best_at][:, left]
                S = S[np.ix_(left, left)]
                S -= h.T @ h
                if weights is not None:
                    weights = weights[np.ix_(left, left)]
                alive = alive[left]
                where[alive] = np.arange(alive.size)
                order.append(best)
                remaining.remove(best)
                served.add(labels[best])
                sq_tail.append(self._energy(S, weights))
        sq_tail = np.asarray(sq_tail)
        sq_tail[-1] = 0.0  # every column kept: nothing left, whatever the rounding says
        return np.asarray(order, dtype=np.int64), relative_errors(sq_tail, sq_norm)

    def _energy(self, S, weights=None) -> float:
        """``tr(S)``, or ``tr(W S Wᵀ)`` with consumer weights (``weights``: ``WᵀW`` on the
        columns of ``S``, by default all of it)."""
        if self.weight_gram is None:
            return float(np.trace(S))
        return float(np.einsum("ij,ji->", self.weight_gram if weights is None else weights, S))

    def _gain(self, h, weights=None) -> float:
        """``tr(hᵀh)`` (or ``tr(W hᵀh Wᵀ)``), what keeping the block of ``h`` removes
        (``weights`` as for :meth:`_energy`).

        Without weights it is ``‖h‖_F²``, summed column by column as the trace of the product
        sums it, without the m × m product: r·m operations instead of r·m².
        """
        if self.weight_gram is None:
            return float(np.einsum("ij,ij->j", h, h).sum())
        return self._energy(h.T @ h, weights)

    @staticmethod
    def _half(S, cols, cutoff):
        """``S[b,b]^(-1/2) S[b, :]`` (up to an orthogonal factor on the left, from ``S[b,b]``'s
        Cholesky factor where it is safely definite): its squared norm is what keeping block
        ``b`` removes."""
        rows = S[cols]
        return inverse_root_product(rows[:, cols], rows, cutoff)

    def select(self, k: int):
        """The first ``k`` blocks: ``(blocks, columns, T)``, ``T`` of shape (len(columns), m).

        ``T`` is the least-squares fit ``min ‖X − X[:, columns] T‖_F`` from the Gram (the
        minimum-norm one where the kept columns are linearly dependent); ``X[:, columns] T``
        reconstructs every column. Keeping every block, ``T`` is the identity (in the order
        of ``columns``): the exact fit, with nothing to solve.
        """
        if not 0 <= k <= self.n_blocks:
            raise ValueError(f"k must be in [0, {self.n_blocks}]; got {k}.")
        kept = self.order[:k]
        columns = np.concatenate([self.blocks[b] for b in kept]) if k else np.array([], int)
        if not k:
            return kept.copy(), columns, np.zeros((0, self.gram.shape[0]))
        if k == self.n_blocks:
            T = np.zeros((columns.size, columns.size))
            T[np.arange(columns.size), columns] = 1.0
            return kept.copy(), columns, T
        with small_step(self.gram.shape[0]):
            T = least_squares_fold(self.gram, columns)
        return kept.copy(), columns, T
