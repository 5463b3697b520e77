"""Per-group greedy head selections: candidates for few query heads per key/value group.

The rounds of :class:`skid._linalg.BlockPivotedFactorization` take, one group after another,
the head that removes the most of what the heads kept so far leave: a choice made for the
whole output, where the first group's head decides what the second group's has left to do.
With one or two heads per group the order matters most, and a plainer rule does better on
trained models (``benchmarks/README.md``): each key/value group on its own, a greedy block ID
of its own heads' columns (``own``), or of every column (``all``), none of them seeing the
others' choice. Both are offered as candidates; :class:`~skid.nn._heads.HeadFactorization`
keeps, per head count, the selection judged best on a held-out calibration batch
(:mod:`skid.nn._head_judge`), or with one batch the smallest exact error of the least-squares
fold.
"""

from __future__ import annotations

import numpy as np

from .._linalg import BlockPivotedFactorization, least_squares_fold, pinvh_solve
from ._parallel import map_for_width

__all__ = ["SMALL_PER_GROUP", "FixedHeads", "GroupwiseGreedy", "groupwise_builders"]

#: Heads per key/value group up to which the per-group candidates are tried.
SMALL_PER_GROUP = 2


def groupwise_builders(heads, labels, weight_gram=None) -> dict:
    """``{mode name: a function of the Gram building its GroupwiseGreedy}`` for the small
    per-group counts (none without groups); the caller builds them, side by side for wide
    Grams.

    Parameters
    ----------
    heads : list of int arrays
        Columns of each head.
    labels : ndarray of int
        Key/value group of each head.
    weight_gram : ndarray of shape (m, m), optional
        ``WᵀW`` of the output projection: errors are then output errors.
    """
    labels = np.asarray(labels)
    groups = np.unique(labels)
    size = len(heads) // max(len(groups), 1)
    if len(groups) < 2 or size < 2:
        return {}
    counts = range(1, min(SMALL_PER_GROUP, size - 1) + 1)
    return {f"per_group_{scope}": lambda gram, scope=scope: GroupwiseGreedy(
                gram, heads, labels, counts, scope, weight_gram)
            for scope in ("own", "all")}


class FixedHeads:
    """Given head sets, one per count, with ``T`` the least-squares fold on ``gram``'s rows
    and the exact error. Has what :class:`~skid.nn._heads.HeadFactorization` reads from a
    mode: ``n_blocks``, ``errors[blocks]`` (infinite where no set was given; ``blocks`` counts
    heads) and ``select(blocks)``.

    Parameters
    ----------
    gram : ndarray of shape (m, m)
        Gram of the output projection's input.
    heads : list of int arrays
        Columns of each head.
    weight_gram : ndarray of shape (m, m), optional
        ``WᵀW`` of the output projection: errors are then output errors.
    """

    def __init__(self, gram, heads, weight_gram=None):
        self.gram = np.asarray(gram, dtype=np.float64)
        self.heads = [np.asarray(h, dtype=np.int64) for h in heads]
        self.weight_gram = weight_gram
        self.n_blocks = len(self.heads)
        self.errors = np.full(self.n_blocks + 1, np.inf)
        self._kept = {}
        self._total = self._energy(self.gram, slice(None))

    def add(self, *kept_sets) -> None:
        """Offer the heads of each set at its count (their errors side by side for a wide
        Gram)."""
        kept_sets = [np.sort(np.asarray(kept, dtype=np.int64)) for kept in kept_sets]
        errors = map_for_width(self._error, kept_sets, len(self.gram))
        for kept, error in zip(kept_sets, errors, strict=True):
            self._kept[kept.size] = kept
            self.errors[kept.size] = error

    def _columns(self, kept) -> np.ndarray:
        return np.concatenate([self.heads[h] for h in kept])

    def _fit(self, kept):
        columns = self._columns(kept)
        return columns, least_squares_fold(self.gram, columns)

    def _energy(self, gram, columns) -> float:
        """``tr(G)`` or ``tr(W G Wᵀ)`` of a Gram (with weights, ``columns`` of W's input)."""
        if self.weight_gram is None:
            return float(np.trace(gram))
        return float(np.einsum("ij,ji->", self.weight_gram[columns][:, columns], gram))

    def _error(self, kept) -> float:
        """Exact relative error of the least-squares fold from the kept heads' columns:
        ``‖X − X_K T‖² = tr(G) − tr(G_KK⁺ G_K: G_:K)`` (no m × m product)."""
        columns = self._columns(kept)
        G_K = self.gram[columns]  # (|K|, m)
        projected = G_K @ G_K.T if self.weight_gram is None else G_K @ self.weight_gram @ G_K.T
        explained = float(pinvh_solve(G_K[:, columns], projected).trace())
        total = self._total
        return float(np.sqrt(max(total - explained, 0.0) / total)) if total > 0 else 0.0

    def select(self, blocks: int):
        """``(heads, columns, T)`` of the candidate with ``blocks`` heads."""
        kept = self._kept[int(blocks)]
        columns, T = self._fit(kept)
        return kept.copy(), columns, T


class GroupwiseGreedy(FixedHeads):
    """Per-group greedy selections at a few per-group counts, with their exact errors.

    Parameters
    ----------
    gram, heads, labels, weight_gram
        As :func:`groupwise_builders`.
    counts : iterable of int
        Heads per group to build.
    scope : {"own", "all"}
        Each group's greedy reconstructs its own heads' columns, or all columns.
    """

    def __init__(self, gram, heads, labels, counts, scope, weight_gram=None):
        super().__init__(gram, heads, weight_gram)
        labels = np.asarray(labels)
        groups = np.unique(labels)
        counts = list(counts)
        orders = {g: self._group_order(np.flatnonzero(labels == g), scope, max(counts))
                  for g in groups}
        self.add(*(np.concatenate([orders[g][:count] for g in groups]) for count in counts))

    def _group_order(self, members, scope, steps: int) -> np.ndarray:
        """The group's first ``steps`` heads in the order of its own greedy block ID."""
        columns = np.concatenate([self.heads[h] for h in members])
        if scope == "own":
            local = [np.arange(i * len(self.heads[h]), (i + 1) * len(self.heads[h]))
                     for i, h in enumerate(members)]
            weights = (None if self.weight_gram is None
                       else self.weight_gram[np.ix_(columns, columns)])
            fac = BlockPivotedFactorization(self.gram[np.ix_(columns, columns)], local, None,
                                            weights)
            return members[fac.order[:steps]]
        # every column: a greedy whose candidates are this group's heads only
        order, chosen = [], []
        remaining = list(members)
        while remaining and len(order) < steps:
            errors = [self._error(np.array(chosen + [h])) for h in remaining]
            best = remaining[int(np.argmin(errors))]
            order.append(best)
            chosen.append(best)
            remaining.remove(best)
        return np.asarray(order, dtype=np.int64)
