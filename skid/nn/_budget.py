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

A unit's relative error is not the same currency in every layer: what it does to the model's
output differs. ``weights`` (one per unit: the squared output change per squared relative error,
measured on the model, see :mod:`skid.nn._sensitivity`) turn the curves into estimates of the
output error, ``Σ w_i e_i(k_i)²``, and the greedy runs on those too. Where the units are of
several kinds (channel groups and heads), the uniform cut of one kind alone is a candidate as
well: a model whose heads are a poor use of the budget keeps them all.
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
    "uniform_widths",
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
    terms : tuple of (float, tuple of int, tuple of (int, float))
        One entry per module whose FLOPs depend on units: its FLOPs at full width, the units
        whose kept fraction multiplies them, and the parts of a concatenation it reads — unit
        and share of its input channels — whose kept fractions *add up*: the term is
        ``f · Π ratio[idx] · (1 + Σ share · (ratio[part] − 1))``.
    """

    widths: np.ndarray
    fixed: float
    terms: tuple

    @classmethod
    def from_units(cls, units, module_flops: dict, total: float,
                   concat_widths: dict | None = None) -> FlopsModel:
        """Build the model from channel groups (their producers, passthroughs, consumers).

        A module's FLOPs scale with the group it produces or passes through (output channels)
        and with the group it consumes (input channels); modules not in ``module_flops`` cost 0.
        A module that reads (or passes through) groups as parts of a concatenation scales with
        the share of its channels they keep: ``concat_widths`` gives its channels there.
        """
        concat_widths = concat_widths or {}
        products: dict[str, set] = {}
        parts: dict[str, dict] = {}
        for i, unit in enumerate(units):
            for name in unit.modules():
                if unit.before(name) and name in concat_widths:
                    parts.setdefault(name, {})[i] = unit.width / concat_widths[name]
                else:
                    products.setdefault(name, set()).add(i)
        terms = tuple(
            (float(module_flops[name]), tuple(sorted(products.get(name, ()))),
             tuple(sorted(parts.get(name, {}).items())))
            for name in dict.fromkeys([*products, *parts])
            if module_flops.get(name, 0) > 0
        )
        widths = np.array([u.width for u in units], dtype=np.int64)
        return cls(widths=widths, fixed=float(total) - sum(t[0] for t in terms), terms=terms)

    @property
    def total(self) -> float:
        """FLOPs at full width."""
        return self.fixed + sum(t[0] for t in self.terms)

    def __call__(self, kept) -> float:
        """FLOPs with ``kept[i]`` channels kept in unit ``i``."""
        ratio = np.asarray(kept, dtype=float) / self.widths
        return self.fixed + sum(f * float(np.prod(ratio[list(idx)])) * _share(ratio, parts)
                                for f, idx, parts in self.terms)

    def channel_cost(self, kept, unit: int) -> float:
        """FLOPs of one channel of ``unit`` at the current widths (FLOPs are linear in it)."""
        ratio = np.asarray(kept, dtype=float) / self.widths
        cost = 0.0
        for f, idx, parts in self.terms:
            if unit in idx:
                others = [j for j in idx if j != unit]
                cost += f / self.widths[unit] * float(np.prod(ratio[others])) * _share(ratio,
                                                                                      parts)
            for j, share in parts:
                if j == unit:
                    cost += f * float(np.prod(ratio[list(idx)])) * share / self.widths[unit]
        return cost

    def neighbours(self) -> list[set]:
        """For each unit, the other units sharing a module with it."""
        near = [set() for _ in self.widths]
        for _, idx, parts in self.terms:
            members = set(idx) | {j for j, _ in parts}
            for i in members:
                near[i].update(members - {i})
        return near


def _share(ratio: np.ndarray, parts) -> float:
    """Kept share of a concatenation's channels: ``1 + Σ share · (ratio − 1)`` (1 if none)."""
    return 1.0 + sum(share * (ratio[j] - 1.0) for j, share in parts)


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


def flops_candidates(errors, flops: FlopsModel, target: float,
                     minimum=None, *, weights=None, kinds=None) -> list[np.ndarray]:
    """Allocations within budget, best sum of squared errors first, without repeats.

    The greedy and the uniform allocation (both refilled), then the plain uniform cut (the
    same fraction of every unit, as ``rank`` would keep). The caller may measure which one
    preserves the model's outputs better (the squared-error sum is a proxy for that, not a
    guarantee); with the plain cut among them, the one it keeps is never worse there than
    keeping the same fraction of every unit. ``minimum`` gives each unit's smallest width
    (default 1; e.g. one query head per key/value group). ``weights`` (one positive number per
    unit) add, first, the greedy on the weighted curves ``w_i e_i²``; ``kinds`` (a label per
    unit) add, last, the uniform cut of each kind alone, the other units whole, where that
    meets the budget.

    Raises
    ------
    ValueError
        If the target is below the FLOPs of keeping one channel in every unit.
    """
    errors = [np.asarray(e, dtype=float) for e in errors]
    budget = target * flops.total
    minimum = np.ones_like(flops.widths) if minimum is None else np.asarray(minimum, np.int64)
    smallest = flops(minimum)
    if smallest > budget * (1 + 1e-12):
        raise ValueError(
            f"target_flops={target!r} cannot be reached: keeping the fewest channels (or "
            f"heads) in every prunable unit still costs {smallest / flops.total:.4g} of the "
            f"model's FLOPs; use a target_flops of at least that, or prune more layers."
        )
    greedy = _refill(_greedy(errors, flops, budget, minimum), errors, flops, budget)
    plain = _uniform(flops, budget, minimum)
    uniform = _refill(plain, errors, flops, budget)
    found = sorted([greedy, uniform], key=lambda w: _objective(errors, w)) + [plain]
    if weights is not None:
        scaled = _weighted(errors, weights)
        found.insert(0, _refill(_greedy(scaled, flops, budget, minimum), scaled, flops, budget))
    for kind in dict.fromkeys(kinds if kinds is not None else ()):
        if len(set(kinds)) > 1:
            alone = _uniform(flops, budget, minimum, [k == kind for k in kinds])
            if flops(alone) <= budget * (1 + 1e-12):
                found.append(alone)
    candidates = []
    for widths in found:
        if not any(np.array_equal(widths, other) for other in candidates):
            candidates.append(widths)
    return candidates


def uniform_widths(flops: FlopsModel, target: float, minimum=None) -> np.ndarray:
    """The plain uniform cut: the largest same fraction of every unit within the budget."""
    minimum = None if minimum is None else np.asarray(minimum, np.int64)
    return _uniform(flops, target * flops.total, minimum)


def _weighted(errors, weights) -> list[np.ndarray]:
    """Curves whose squares are ``w_i e_i²``: the greedy's currency becomes output error."""
    weights = np.asarray(weights, dtype=float)
    if weights.shape != (len(errors),) or not (np.isfinite(weights).all() and
                                               (weights >= 0).all()):
        raise ValueError(f"weights must hold one finite nonnegative number per unit; "
                         f"got {weights!r}.")
    return [e * np.sqrt(w) for e, w in zip(errors, weights, strict=True)]


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


def _greedy(errors, flops: FlopsModel, budget: float, minimum=None) -> np.ndarray:
    """Remove one channel at a time, cheapest squared-error increase per FLOP first."""
    minimum = np.ones_like(flops.widths) if minimum is None else minimum
    kept = flops.widths.copy()
    near = flops.neighbours()
    version = np.zeros(len(kept), dtype=np.int64)

    def entry(i):
        if kept[i] <= minimum[i]:
            return (math.inf, version[i], i)
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


def _uniform(flops: FlopsModel, budget: float, minimum=None, cut=None) -> np.ndarray:
    """Widths ``max(minimum, ceil(r * width))`` for the largest fraction ``r`` within budget.

    ``cut`` (a boolean per unit) restricts the cut to those units; the others stay whole (the
    result may then exceed the budget: the caller checks).
    """
    minimum = np.ones_like(flops.widths) if minimum is None else minimum
    cut = np.ones(len(flops.widths), bool) if cut is None else np.asarray(cut, bool)

    def widths(fraction):
        return np.where(cut, np.maximum(minimum, widths_for_rank(flops.widths, fraction)),
                        flops.widths)

    fractions = np.unique(
        np.concatenate([np.arange(1, m + 1) / m for m in flops.widths[cut]] + [np.ones(1)])
    )
    lo, hi = 0, len(fractions) - 1  # fractions[lo]: the minimum everywhere it may cut
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if flops(widths(fractions[mid])) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return widths(fractions[lo])


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
