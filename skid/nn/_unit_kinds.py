"""Unit kinds: what the planner does differently for a channel group and an attention block.

A *unit* is what one selection narrows: a channel group (:class:`skid.nn._plan.Unit`,
``kind="channels"``) or the heads of one attention block (:class:`skid.nn._heads.HeadUnit`,
``kind="heads"``). Everything the planner, the width rules and the report need to tell them
apart is one method of one entry here, found by the unit's ``kind``; a new kind of unit (a
residual stream) is one new entry, registered with :func:`register_unit_kind`.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from .._linalg import PivotedFactorization, factorize_for_outputs
from . import _budget, _intercept
from ._heads import CorrectiveHeadFactorization, HeadFactorization, apply_head_selection
from ._joint import interpolations_for
from ._plan import Selection
from ._surgery import apply_selection, fold_constant, offset_of, weight_gram

__all__ = ["UnitKind", "register_unit_kind", "unit_kind"]


class UnitKind:
    """The behaviour of one kind of unit; subclasses override what differs.

    ``fits_corrective``: whether ``calibration="corrective"`` fits a ``T`` to the original
    model's activations (a kind without one is calibrated as ``"sequential"`` there).
    ``prune``: the entry of the ``prune`` parameter that asks for units of this kind.
    ``sums_readings``: a unit's error is the root of the *sum* of its readings' squared
    relative errors (:func:`skid.nn._joint.reading_error`), not of their mean.
    ``gram_factorization``: ``f(gram, unit, held_out=None)`` factorizing the unit's one Gram
    its own way (whole heads), or None for the channels' pivoted factorizations.
    """

    fits_corrective = True
    prune = "channels"
    sums_readings = False
    gram_factorization = None

    def statistic_width(self, unit) -> int:
        """Columns of the unit's statistic (what its consumers read of it)."""
        return unit.width

    def holds_out(self, unit) -> bool:
        """Whether the statistics pass gathers the first batch's Gram apart (``held_out`` of
        ``gram_factorization``): the unit chooses among candidates on held-out rows."""
        return False

    def statistics(self, source, key, unit):
        """The unit's factorization from a pass of its own, or None: it shares the pass of
        the channel groups and heads (:meth:`StatisticsSource.statistics`)."""
        return None

    def select(self, unit, fac, k) -> Selection:
        """The plan record of ``unit`` kept at width ``k``."""
        raise NotImplementedError

    def apply(self, model, selection) -> None:
        """Fold ``selection`` into ``model`` in place."""
        apply_selection(model, selection)

    def report(self, selection) -> dict:
        """One row of ``layers_``."""
        raise NotImplementedError

    @staticmethod
    def row(selection, kind, producers, consumers, width_before, width_after, **extra) -> dict:
        """The ``layers_`` fields every kind reports, then the kind's own (``extra``)."""
        unit = selection.unit
        return {"producer": unit.producer, "consumer": unit.consumer, "kind": kind,
                "producers": list(producers), "consumers": list(consumers),
                "width_before": int(width_before), "width_after": int(width_after),
                "error": float(selection.error), **extra}

    def width_for_rank(self, unit, fac, rank: float) -> int:
        return int(_budget.widths_for_rank([unit.width], rank)[0])

    def smallest(self, fac) -> int:
        """The smallest width the model's code runs (``target_flops``'s lower bound)."""
        return 1

    def runnable(self, fac, k) -> int:
        """A width the model's code runs with the error of ``k`` (``fac``: an ErrorCurve will
        do)."""
        return int(k)

    def own_flops(self, unit) -> list:
        """Modules whose own FLOPs (beyond their dense layers) the unit narrows."""
        return []

    def consumer_width(self, unit, gram) -> int:
        """How many of a consumer's input channels belong to the unit."""
        return unit.width

    def for_outputs(self, work, unit, fac, pivots: str):
        """``fac`` re-pivoted for the consumers' outputs, or None where that does not apply."""
        raise NotImplementedError

    def corrective_factorization(self, stats, unit, selection: str):
        """The corrective factorization of ``stats`` (:class:`CrossStatistics`)."""
        return stats.factorize(selection)

    def corrective_for_outputs(self, work, unit, stats, pivots: str):
        """The corrective factorization with channels weighted by the consumers' weights."""
        weights = sum(consumer_weight_gram(work, unit, c) for c in unit.consumers)
        return stats.factorize_weighted(np.sqrt(np.maximum(np.diag(weights), 0.0)))


class _Channels(UnitKind):
    def select(self, unit, fac, k) -> Selection:
        if fac.n_features != unit.width:
            raise RuntimeError(
                f"Internal error: the statistics of {unit.producer!r} have {fac.n_features} "
                f"channels, the unit {unit.width}."
            )
        keep, T = fac.select(int(k))
        per_consumer = interpolations_for(unit, fac, keep, T)
        b = _intercept.intercept(fac, keep, T)  # fit_intercept's constant, or None
        return Selection(
            unit=unit,
            keep=torch.as_tensor(keep, dtype=torch.int64),
            interpolation=torch.as_tensor(T if per_consumer is None else per_consumer[0]),
            error=float(fac.errors[len(keep)]),  # a grouped width may round k down
            interpolations=None if per_consumer is None else tuple(
                torch.as_tensor(t) for t in per_consumer),
            intercepts=None if b is None else (torch.as_tensor(b),) * len(unit.consumers),
        )

    def report(self, selection) -> dict:
        unit = selection.unit
        return self.row(selection, unit.kind, unit.producers, [c.name for c in unit.consumers],
                        unit.width, selection.keep.numel())

    def for_outputs(self, work, unit, fac, pivots):
        weights = lambda: sum(consumer_weight_gram(work, unit, c)  # noqa: E731
                              for c in unit.consumers)
        if isinstance(fac, _intercept.InterceptFactorization):  # the centred factorization
            return fac.for_outputs(lambda f: factorize_for_outputs(f, weights(), pivots))
        if not isinstance(fac, PivotedFactorization):
            return None  # joint or block statistics: no single output
        return factorize_for_outputs(fac, weights(), pivots)


class _Heads(UnitKind):
    prune = "heads"
    gram_factorization = HeadFactorization

    def statistic_width(self, unit) -> int:
        return unit.n_heads * unit.head_dim  # every head's columns

    def holds_out(self, unit) -> bool:
        # several candidates per count only with groups (fit_intercept: its centred Gram)
        return unit.group_size > 1 and unit.n_kv_heads > 1 and not _intercept.applies(unit)

    def select(self, unit, fac, k):
        selection = fac.select(int(k))  # the nearest count the model's code runs
        d = unit.head_dim
        columns = (selection.heads[:, None] * d + np.arange(d)).ravel()
        b = _intercept.intercept(fac, columns, selection.interpolation)
        return selection if b is None else replace(selection, intercept=b)

    def apply(self, model, selection) -> None:
        if getattr(selection, "intercept", None) is not None:  # W b before the fold
            fold_constant(model.get_submodule(selection.unit.consumer), selection.intercept)
        apply_head_selection(model, selection)

    def report(self, selection) -> dict:
        unit = selection.unit
        kv_after = selection.kv_heads.size if unit.group_size > 1 else selection.heads.size
        return self.row(selection, "heads", unit.producers, [unit.consumer], unit.n_heads,
                        selection.heads.size, attention=unit.attention,
                        kv_heads_before=int(unit.n_kv_heads), kv_heads_after=int(kv_after))

    def width_for_rank(self, unit, fac, rank):
        return int(fac.width_for_rank(rank))

    def smallest(self, fac):
        return int(fac.valid_counts[0])

    def runnable(self, fac, k):
        return int(fac.valid(k))

    def own_flops(self, unit):
        return [unit.attention]  # the attention scores

    def consumer_width(self, unit, gram):
        return gram.shape[0]

    def for_outputs(self, work, unit, fac, pivots):
        return _with_means(fac.for_outputs(consumer_weight_gram(work, unit, unit.consumers[0])),
                           getattr(fac, "means", None))

    def corrective_factorization(self, stats, unit, selection):
        return _with_means(CorrectiveHeadFactorization(stats, unit), stats.means)

    def corrective_for_outputs(self, work, unit, stats, pivots):
        weights = consumer_weight_gram(work, unit, unit.consumers[0])
        return _with_means(CorrectiveHeadFactorization(stats, unit, weights), stats.means)


def _with_means(fac, means):
    """A head factorization carrying ``fit_intercept``'s means (for its constant)."""
    if means is not None:
        fac.means = means
    return fac


class _ResidualStage(_Channels):
    """A CNN stage's residual stream (:mod:`skid.nn._residual_stages`): a channel group whose
    producers are the stream's writers and consumers its readers. Its row is a ``"residual"``
    one, as a transformer stream's, and also names the per-channel modules sliced with it.
    Each of its readings feeds another block, so its error sums theirs (measured on the digits
    ResNet and MobileNetV2 in ``benchmarks/bench_residual.py``: the mean let ``target_flops``
    cut the stream too deep)."""

    prune = "residual"
    sums_readings = True

    def report(self, selection) -> dict:
        return {**super().report(selection), "kind": "residual",
                "passthroughs": list(selection.unit.passthroughs)}


_KINDS: dict[str, UnitKind] = {"channels": _Channels(), "heads": _Heads(),
                               "residual_stage": _ResidualStage()}


def register_unit_kind(name: str, kind: UnitKind) -> None:
    """Make units whose ``kind`` is ``name`` behave as ``kind`` says."""
    if not isinstance(kind, UnitKind):
        raise TypeError(f"kind must be a UnitKind; got {type(kind).__name__}.")
    _KINDS[name] = kind


def unit_kind(unit) -> UnitKind:
    """The registered behaviour of ``unit``'s kind."""
    try:
        return _KINDS[unit.kind]
    except KeyError:
        raise ValueError(f"No unit kind {unit.kind!r} is registered (known: "
                         f"{sorted(_KINDS)}); register it with register_unit_kind.") from None


def consumer_weight_gram(work, unit, consumer) -> np.ndarray:
    """``WᵀW`` of one consumer over the unit's channels (its slice of a concatenation)."""
    gram = weight_gram(work.get_submodule(consumer.name), consumer.positions)
    start = offset_of(work, consumer.before)
    stop = start + unit_kind(unit).consumer_width(unit, gram)
    return gram[start:stop, start:stop]
