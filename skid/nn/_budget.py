"""Per-unit widths from ``tol``, ``rank`` or ``target_flops`` (pure NumPy, no torch).

Every function takes the units' exact error curves: ``errors[i][k]`` is unit ``i``'s relative
ID error ``‖Z − Z[:, J_k] T_k‖_F / ‖Z‖_F`` when it keeps its first ``k`` pivots, an array of
shape ``(width_i + 1,)``, nonincreasing, ending in 0.

For ``target_flops`` the model's FLOPs are written as a function of the kept widths
(:class:`FlopsModel`): a module's FLOPs scale with the kept fraction of every unit whose
channels it touches, e.g. a conv that consumes unit ``a`` and produces unit ``b`` costs
``f · (k_a / m_a) · (k_b / m_b)``. Widths are then allocated greedily by the increase of the
*squared* relative error per FLOP saved, and the result is compared with a uniform fraction at
the same budget; the better of the two (sum of squared errors) is returned.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import numpy as np

from .. import _policy

__all__ = [
    "FlopsModel",
    "flops_candidates",
    "widths_for_flops",
    "widths_for_rank",
    "widths_for_tol",
]


def widths_for_tol(errors, tol: float) -> np.ndarray:
    """Smallest width ``k >= 1`` per unit with ``errors[k] <= tol``; int64 array (n_units,)."""
    return np.array([_policy.width_for_tol(e, tol) for e in errors], dtype=np.int64)


def widths_for_rank(widths, rank: float) -> np.ndarray:
    """``ceil(rank * width)`` per unit, at least 1 (the policy's rounding); int64 (n_units,)."""
    return _policy.widths_for_fraction(rank, widths)


@dataclass(frozen=True)
class FlopsModel:
    """FLOPs per sample of a model as a function of the kept width of every unit.

    Attributes
    ----------
    widths : ndarray of shape (n_units,)
        Full widths.
    fixed : float
        FLOPs that do not depend on any unit.
    terms : tuple of (float, tuple of int)
        One entry per module whose FLOPs depend on units: its FLOPs at full width, and the
        units whose kept fraction multiplies them.
    """

    widths: np.ndarray
    fixed: float
    terms: tuple

    @classmethod
    def from_units(cls, units, module_flops: dict, total: float) -> FlopsModel:
        """Build the model from units (``producer``, ``consumer``, ``passthroughs`` names).

        A module's FLOPs scale with the unit it produces or passes through (output channels)
        and with the unit it consumes (input channels); modules not in ``module_flops`` cost 0.
        """
        touched: dict[str, set] = {}
        for i, unit in enumerate(units):
            for name in (unit.producer, unit.consumer, *unit.passthroughs):
                touched.setdefault(name, set()).add(i)
        terms = tuple(
            (float(module_flops[name]), tuple(sorted(idx)))
            for name, idx in touched.items()
            if module_flops.get(name, 0) > 0
        )
        widths = np.array([u.width for u in units], dtype=np.int64)
        return cls(widths=widths, fixed=float(total) - sum(f for f, _ in terms), terms=terms)

    @property
    def total(self) -> float:
        """FLOPs at full width."""
        return self.fixed + sum(f for f, _ in self.terms)

    def __call__(self, kept) -> float:
        """FLOPs with ``kept[i]`` channels kept in unit ``i``."""
        ratio = np.asarray(kept, dtype=float) / self.widths
        return self.fixed + sum(f * float(np.prod(ratio[list(idx)])) for f, idx in self.terms)

    def channel_cost(self, kept, unit: int) -> float:
        """FLOPs of one channel of ``unit`` at the current widths (FLOPs are linear in it)."""
        ratio = np.asarray(kept, dtype=float) / self.widths
        return sum(f * float(np.prod(ratio[others])) for f, others in self._per_unit[unit])

    @property
    def _per_unit(self) -> list:
        """Per unit: ``(FLOPs per channel, the term's other units)`` for every term with it."""
        cached = self.__dict__.get("_per_unit_cache")
        if cached is None:
            cached = [[] for _ in self.widths]
            for f, idx in self.terms:
                for i in idx:
                    others = np.array([j for j in idx if j != i], dtype=np.int64)
                    cached[i].append((f / self.widths[i], others))
            object.__setattr__(self, "_per_unit_cache", cached)
        return cached

    def neighbours(self) -> list[set]:
        """For each unit, the other units sharing a module with it."""
        near = [set() for _ in self.widths]
        for _, idx in self.terms:
            for i in idx:
                near[i].update(j for j in idx if j != i)
        return near


def widths_for_flops(errors, flops: FlopsModel, target: float) -> np.ndarray:
    """Widths keeping at most ``target * flops.total`` FLOPs, minimizing Σ errors².

    Greedy removal by squared-error increase per FLOP saved, then the leftover budget is
    refilled; the same refill is applied to the largest uniform fraction within budget, and the
    allocation with the smaller sum of squared errors wins (ties go to the greedy one).

    Raises
    ------
    ValueError
        If the target is below the FLOPs of keeping one channel in every unit.
    """
    return flops_candidates(errors, flops, target)[0]


def flops_candidates(errors, flops: FlopsModel, target: float) -> list[np.ndarray]:
    """Allocations within budget, best sum of squared errors first, without repeats.

    The greedy and the uniform allocation (both refilled), then the plain uniform cut (the
    same fraction of every unit, as ``rank`` would keep). The caller may measure which one
    preserves the model's outputs better (the squared-error sum is a proxy for that, not a
    guarantee); with the plain cut among them, the one it keeps is never worse there than
    keeping the same fraction of every unit.

    Raises
    ------
    ValueError
        If the target is below the FLOPs of keeping one channel in every unit.
    """
    errors = [np.asarray(e, dtype=float) for e in errors]
    budget = target * flops.total
    smallest = flops(np.ones_like(flops.widths))
    if smallest > budget * (1 + 1e-12):
        raise ValueError(
            f"target_flops={target!r} cannot be reached: keeping one channel in every prunable "
            f"unit still costs {smallest / flops.total:.4g} of the model's FLOPs; use a "
            f"target_flops of at least that, or prune more layers."
        )
    greedy = _refill(_greedy(errors, flops, budget), errors, flops, budget)
    plain = _uniform(flops, budget)
    uniform = _refill(plain, errors, flops, budget)
    candidates = []
    for widths in sorted([greedy, uniform], key=lambda w: _objective(errors, w)) + [plain]:
        if not any(np.array_equal(widths, other) for other in candidates):
            candidates.append(widths)
    return candidates


def _objective(errors, kept) -> float:
    """Sum of squared relative errors at the given widths."""
    return float(sum(e[k] ** 2 for e, k in zip(errors, kept, strict=True)))


def _removal_key(errors: np.ndarray, k: int, channel_cost: float) -> float:
    """Cheapest squared-error increase per FLOP for removing 1..k-1 channels of a unit at width k.

    Looking past the next channel (the lower convex hull) keeps the greedy from stalling on a
    flat step that hides a cheap drop further down the curve.
    """
    if k <= 1 or channel_cost <= 0:
        return math.inf
    squared = errors[1:k] ** 2  # widths 1..k-1
    increase = squared - errors[k] ** 2
    removed = k - np.arange(1, k)
    return float(np.min(increase / removed)) / channel_cost


def _greedy(errors, flops: FlopsModel, budget: float) -> np.ndarray:
    """Remove one channel at a time, cheapest squared-error increase per FLOP first."""
    kept = flops.widths.copy()
    near = flops.neighbours()
    version = np.zeros(len(kept), dtype=np.int64)

    def entry(i):
        return (_removal_key(errors[i], kept[i], flops.channel_cost(kept, i)), version[i], i)

    heap = [entry(i) for i in range(len(kept))]
    heapq.heapify(heap)
    current = flops(kept)
    while current > budget and heap:
        key, seen, i = heapq.heappop(heap)
        if seen != version[i]:
            continue
        if math.isinf(key):
            break
        current -= flops.channel_cost(kept, i)
        kept[i] -= 1
        for j in (i, *near[i]):
            version[j] += 1
            heapq.heappush(heap, entry(j))
    return kept


def _uniform(flops: FlopsModel, budget: float) -> np.ndarray:
    """Widths ``max(1, ceil(r * width))`` for the largest fraction ``r`` within budget."""
    fractions = np.unique(
        np.concatenate([np.arange(1, m + 1) / m for m in flops.widths] + [np.ones(1)])
    )
    lo, hi = 0, len(fractions) - 1  # fractions[lo] is feasible (it keeps width 1 everywhere)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if flops(widths_for_rank(flops.widths, fractions[mid])) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return widths_for_rank(flops.widths, fractions[lo])


def _refill(kept, errors, flops: FlopsModel, budget: float) -> np.ndarray:
    """Add back channels that still fit the budget, best squared-error decrease per FLOP first."""
    kept = np.array(kept, dtype=np.int64)
    current = flops(kept)
    while True:
        best, best_gain, best_cost = None, -1.0, 0.0
        for i, (e, k) in enumerate(zip(errors, kept, strict=True)):
            if k >= flops.widths[i]:
                continue
            cost = flops.channel_cost(kept, i)
            if current + cost > budget:
                continue
            gain = (e[k] ** 2 - e[k + 1] ** 2) / cost if cost > 0 else math.inf
            if gain > best_gain:
                best, best_gain, best_cost = i, gain, cost
        if best is None:
            return kept
        kept[best] += 1
        current += best_cost
