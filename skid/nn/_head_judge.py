"""Head candidates judged on held-out calibration rows.

At one or two query heads per key/value group, :class:`~skid.nn._heads.HeadFactorization`
has several candidates per head count (the rounds of the block-pivoted greedy, the per-group
greedy of :mod:`skid.nn._head_greedy`, whole groups). Their exact error on the rows the fold
was fitted to is a weak judge: on the benchmark's LLaMA the candidate with the smaller
calibration error had the worse perplexity (``benchmarks/README.md``). So, as ``target_flops``
does for widths, the first calibration batch is held out: every candidate is built from the
Gram of the other rows, and the heads of the one whose fold best reconstructs what the output
projection makes of the held-out rows are kept, with ``T`` fitted on all rows. The first
batch's Gram is gathered apart in the same statistics pass (Grams add up:
``G = G_rest + G_held``), so judging costs no forward pass; and the candidates it decides are
not built again on all rows, only the winners' folds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._parallel import map_for_width

__all__ = ["HeldOutGrams", "held_out_error", "judged_on_held_out"]


@dataclass(frozen=True)
class HeldOutGrams:
    """The Gram without the first calibration batch (``rest``) and that batch's (``held``),
    at one scale (``rest + held`` is the Gram of all rows), and ``weights``, the output
    projection's ``WᵀW`` (None: judge the input), by which the held-out rows are judged."""

    rest: np.ndarray
    held: np.ndarray
    weights: np.ndarray | None = None

    @classmethod
    def combined(cls, rest, rest_exp: int, held, held_exp: int, weights=None):
        """``(Gram of all rows, HeldOutGrams)`` from two Grams kept as ``XᵀX / 4**exp``."""
        exp = max(rest_exp, held_exp)  # both at the larger scale: exact powers of two
        rest = np.ldexp(np.asarray(rest, dtype=np.float64), 2 * (rest_exp - exp))
        held = np.ldexp(np.asarray(held, dtype=np.float64), 2 * (held_exp - exp))
        return rest + held, cls(rest, held, weights)


def held_out_error(gram, columns, T, weight_gram=None) -> float:
    """Relative error ``‖X − X_K T‖_F / ‖X‖_F`` of a fold on the rows whose Gram is ``gram``
    (with ``weight_gram = WᵀW``, of the outputs ``X Wᵀ``), from the Gram alone:
    ``tr(G) − 2 tr(Tᵀ G_K:) + tr(Tᵀ G_KK T)``, weighted. ``O(m² |K|)``, no m × m product."""
    G_K = gram[columns]  # (|K|, m)
    G_KK = G_K[:, columns]
    if weight_gram is None:
        total = float(np.trace(gram))
        left = total - 2.0 * float(np.vdot(T, G_K)) + float(np.vdot(T, G_KK @ T))
    else:
        total = float(np.vdot(weight_gram, gram))
        weighted = T @ weight_gram  # |K| m² of the error's |K| m² + |K|² m: made once
        left = (total - 2.0 * float(np.vdot(weighted, G_K))
                + float(np.vdot(weighted, G_KK @ T)))
    return float(np.sqrt(max(left, 0.0) / total)) if total > 0 else 0.0


def judged_on_held_out(candidates, rest_modes, held_out: HeldOutGrams) -> dict:
    """``{count: kept columns}`` where the candidates for a count, built on the rows without
    the held-out batch (``rest_modes``), keep different heads: the columns of the one whose fold
    has the smallest :func:`held_out_error` on that batch (of the output projection's outputs
    where ``held_out.weights`` is given; the first in order on a tie). Where they keep the
    same heads the held-out rows have nothing to choose between: the count is left out.

    Parameters
    ----------
    candidates : dict
        ``{count: [(mode, blocks), ...]}``, in the modes' order.
    rest_modes : dict
        ``{mode: factorization}`` with ``select(blocks) -> (kept, columns, T)``, built from
        ``held_out.rest``.
    held_out : HeldOutGrams
    """
    width = len(held_out.held)
    chosen = {}
    for count, options in candidates.items():  # one count's folds at a time (|K| × m each)
        if len(options) < 2:
            continue
        fits = map_for_width(lambda option: rest_modes[option[0]].select(option[1])[1:],
                             options, width)
        if len({tuple(np.sort(columns)) for columns, _ in fits}) < 2:
            continue
        errors = map_for_width(
            lambda fit: held_out_error(held_out.held, *fit, held_out.weights), fits, width)
        chosen[count] = np.sort(fits[int(np.argmin(errors))][0])
    return chosen
