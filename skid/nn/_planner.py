"""The planner: statistics → widths → selections, over one pass or a block replay.

:class:`StatisticsSource` answers "the statistics of these units", "the corrective statistics
of this unit against the reference", "rewind" and "the first batch" for the model being
compressed; block-wise calibration (:mod:`skid.nn._blockwise`) swaps in one that replays the
cached block inputs. :class:`Planner` holds the rules every driver shares — the objective,
the width rules (``tol``/``rank``/``target_flops``), the route re-checks, one unit's
selection for each calibration — and :func:`plan_one_pass` runs the calibration modes over
the whole model. Nothing here reads or writes the estimator: the settings come as a
:class:`skid.nn._settings.FitSettings` and the result is a :class:`Plan`.
"""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from .. import _corrective, _policy
from .._linalg import PivotedFactorization
from . import _budget, _sensitivity, _uniform
from ._calibration import fingerprint, reading_consumers
from ._joint import reading_error
from ._outputs import batch_outputs, output_distance
from ._plan import Selection
from ._surgery import concat_widths, sharing_copy
from ._unit_kinds import unit_kind

__all__ = ["Plan", "Planner", "StatisticsSource", "plan_one_pass"]


@dataclass(frozen=True)
class Plan:
    """The selections a fit applied, in the units' forward order.

    Attributes
    ----------
    selections : tuple
        One :class:`skid.nn._plan.Selection` (channel groups) or
        :class:`skid.nn._heads.HeadSelection` (attention heads) per unit; block-wise fits
        keep each ``interpolation`` only until it is folded (an empty ``(0, m)`` tensor then).
    n_samples : int
        Calibration samples seen.
    """

    selections: tuple
    n_samples: int

    @property
    def layers(self) -> list:
        """The per-unit report (``layers_``): one dict per selection."""
        return [unit_kind(s.unit).report(s) for s in self.selections]

    def __iter__(self):
        return iter(self.selections)

    def __len__(self) -> int:
        return len(self.selections)


class StatisticsSource:
    """Statistics of the units of ``work`` from one pass over the whole model.

    ``reference`` is the original model (``"corrective"``); ``changed`` says whether anything
    has been folded into ``work`` yet (until then the compressed input is the original one).
    """

    def __init__(self, work, batches, cache, settings, reference=None):
        self.work, self.batches, self.cache, self.settings = work, batches, cache, settings
        self.reference = reference
        self.changed = False
        self.n_samples = 0

    @property
    def first(self):
        """The first calibration batch (the same on every rank)."""
        return self.batches.first

    @property
    def rereadable(self) -> bool:
        return self.batches.rereadable

    def rewind(self) -> None:
        """Before a pass: nothing to do when the whole model runs."""

    def statistics(self, key, units, *, method=None, precision=None, warn=True) -> list:
        """The factorizations of ``units``' consumer inputs (``key``: their content key)."""
        s = self.settings
        own = {i: unit_kind(u).statistics(self, key, u) for i, u in enumerate(units)}
        own = {i: fac for i, fac in own.items() if fac is not None}
        shared = [u for i, u in enumerate(units) if i not in own]
        facs = []
        if shared:
            self.rewind()
            facs, self.n_samples = self.cache.get(
                key, self.work, shared, self.batches, method=method or s.method,
                precision=precision or s.precision, verbose=s.verbose)
            if warn:
                _warn_few_rows(shared, facs)
        facs = iter(facs)
        return [own[i] if i in own else next(facs) for i in range(len(units))]

    def corrective(self, key, unit, consumer=None):
        """:class:`skid._corrective.CrossStatistics` of ``unit``'s consumer input (or one
        ``consumer``'s reading) on ``work`` against the reference."""
        s = self.settings
        self.rewind()
        upstream = self.reference if self.changed else None  # nothing folded: Z_o = Z_c
        stats, self.n_samples = self.cache.corrective(
            key, self.work, upstream, unit, self.batches, method=s.method,
            precision=s.precision, verbose=s.verbose, consumer=consumer)
        return stats


class Planner:
    """The rules shared by every driver, for one fit's ``settings``.

    ``flops_info`` is ``(per-module FLOPs, total)`` of the original model (``target_flops``).
    """

    def __init__(self, settings, units, flops_info):
        self.settings, self.units, self.flops_info = settings, units, flops_info

    # --------------------------------------------------------------------------- objective

    def for_objective(self, work, units, facs) -> list:
        """The factorizations as the objective reads them (a unit it does not apply to keeps
        its own, with a warning)."""
        objective = self.settings.objective
        result, kept = [], []
        for unit, fac in zip(units, facs, strict=True):
            new = objective.factorization(work, unit, fac)
            if new is None:
                new = fac
                kept.append(unit.producer)
            result.append(new)
        if kept:
            warnings.warn(
                f"objective={objective!r} does not apply to the groups of {kept}: their "
                "consumers read different tensors or are grouped convolutions; they keep the "
                "activation objective.", UserWarning, stacklevel=caller_outside_skid(),
            )
        return result

    # ------------------------------------------------------------------------------ widths

    def widths(self, facs, units, work=None, source=None, key=None) -> np.ndarray:
        """Kept width per unit from ``tol``, ``rank`` or ``target_flops``.

        For ``target_flops`` (:meth:`faithful_widths`) every candidate of
        :meth:`flops_candidates` is tried on held-out calibration rows of ``source``, and the
        one whose outputs stay closest to the model's wins: the error-per-FLOP greedy is a
        proxy, and must never do worse than a uniform cut.
        """
        s = self.settings
        if s.target_flops is not None:
            return self.faithful_widths(source, facs, units, work, key)
        if s.uniform:
            return _uniform.widths(units, facs, rank=s.rank, tol=s.tol)
        if s.rank is not None:
            return np.array([unit_kind(u).width_for_rank(u, fac, s.rank)
                             for u, fac in zip(units, facs, strict=True)], dtype=np.int64)
        return _budget.widths_for_tol([fac.errors for fac in facs], s.tol)

    def flops_candidates(self, facs, units, work, weights=None, plain=False) -> list:
        """The ``target_flops`` allocations worth comparing (:func:`_budget.flops_candidates`:
        greedy, uniform, each kind's uniform cut alone, and with ``weights`` the greedy on the
        output-weighted curves), widths rounded to what the model's code runs. ``plain``: only
        the plain uniform cut. ``facs`` need only ``errors`` (and, for heads,
        ``valid_counts`` and ``valid``): an ``ErrorCurve`` will do."""
        module_flops, total = self.flops_info
        if self.settings.uniform:
            return _uniform.flops_candidates(units, facs, self.flops_info,
                                             self.settings.target_flops,
                                             concat_widths(work, units))
        model = _budget.FlopsModel.from_units(units, module_flops, total,
                                              concat_widths(work, units))
        kinds = [unit_kind(u) for u in units]
        minimum = [kind.smallest(fac) for kind, fac in zip(kinds, facs, strict=True)]
        errors = [fac.errors for fac in facs]
        target = self.settings.target_flops
        if plain:
            found = [_budget.uniform_widths(model, target, minimum)]
        else:
            found = _budget.flops_candidates(errors, model, target, minimum, weights=weights,
                                             kinds=[u.kind for u in units])
        return [
            np.array([kind.runnable(fac, k) for kind, fac, k in zip(kinds, facs, widths,
                                                                     strict=True)])
            for widths in found
        ]

    def faithful_widths(self, source, facs, units, work, key) -> np.ndarray:
        """``target_flops`` with the factorizations at hand: the units' output weights
        (:mod:`skid.nn._sensitivity`), the candidates, and the one whose outputs stay closest
        on held-out calibration rows.

        Where the data split (:func:`_sensitivity.split_held_out`), a second statistics pass
        without the first batch gives the folds the candidates are built with, and that batch
        judges them; otherwise the second (or only) batch judges, in-sample.
        """
        s = self.settings
        batches = source.batches
        split = _sensitivity.split_held_out(batches)
        fitted, judge, first = facs, _sensitivity.held_out_batch(batches), source.first
        if split is not None:
            rest, judge = split
            first = rest.first
            # a source over the rest, so units with a pass of their own (a stream) get it too
            held_out = StatisticsSource(work, rest, source.cache, s)
            fitted = held_out.statistics(None if key is None else fingerprint(key, "held out"),
                                         list(units), warn=False)
            fitted = self.for_objective(work, units, fitted)
        weights = plain = None
        if not s.uniform:  # uniform=True: one width per kind anyway
            (plain,) = self.flops_candidates(facs, units, work, plain=True)
        if len(units) > 1 and plain is not None:
            weights = _sensitivity.output_weights(
                work, units, fitted, plain, first,
                lambda model, unit, fac, k: apply(model, select(unit, fac, k)),
                batch_outputs, output_distance)
        candidates = self.flops_candidates(facs, units, work, weights)
        if len(candidates) == 1:
            return candidates[0]
        return self.most_faithful(work, units, fitted, candidates, judge, plain)

    def most_faithful(self, work, units, facs, candidates, batch, plain=None) -> np.ndarray:
        """The candidate widths whose compressed model's outputs on ``batch`` stay closest,
        and no further than the ``plain`` uniform cut's in distance or direction
        (:func:`_sensitivity.most_faithful`)."""
        reference = batch_outputs(work, batch)

        def gap(widths) -> tuple[float, float]:
            trial = sharing_copy(work)
            for unit, fac, k in zip(units, facs, widths, strict=True):
                apply(trial, select(unit, fac, k))
            return _sensitivity.output_gap(trial, reference, batch)

        gaps = [gap(widths) for widths in candidates]
        return candidates[_sensitivity.most_faithful(gaps, plain_index(candidates, plain))]

    # ---------------------------------------------------------------------------- re-check

    def recheck(self, source, units, facs, widths, key):
        """Recompute on a finer route the units whose width the route that ran does not resolve.

        The estimator's refit, unit by unit: the same rule (:func:`skid._policy.finer_route`)
        says when — a width request's error below what the route resolves, or a width past
        the pivots clear of the statistic's rounding. Where the estimator steps float32
        products → float64 products → QR over data in memory, each step here is a calibration
        pass, so ``method="auto"`` goes to QR at once: one more pass over the units concerned
        (none for the usual ``tol >= 1e-3``); ``method="gram"`` goes to float64 products.
        ``tol`` widths are chosen again from the finer errors; ``rank``/``target_flops``
        widths stay. A one-shot iterator of batches cannot be read again: a warning says so
        and the first statistics are kept.
        """
        s = self.settings
        facs, widths = list(facs), np.array(widths, dtype=np.int64)
        routes = [(s.method, s.precision)] * len(units)
        tol = s.tol_request
        while True:
            finer = {}
            for i, (method, precision) in enumerate(routes):
                if not isinstance(facs[i], PivotedFactorization):
                    continue  # heads, joint and block statistics: no finer route yet
                route = _policy.finer_route(
                    facs[i], int(widths[i]), method=method, precision=precision,
                    auto=s.auto, width_request=tol is None,
                )  # fmt: skip
                if route is not None and s.auto:
                    route = ("qr", route[1])  # a pass costs more than QR: the finest at once
                if route is not None:
                    finer.setdefault(route, []).append(i)
            if not finer:
                return facs, widths
            if not source.rereadable:
                names = sorted({units[i].producer for idx in finer.values() for i in idx})
                warnings.warn(
                    f"The statistics of {names} do not resolve the chosen widths on the "
                    f"{s.method!r} route, and the one-shot iterator of batches cannot be "
                    "read again to recompute them on a finer one; pass a tensor, a list or a "
                    "DataLoader (or method='qr').",
                    UserWarning,
                    stacklevel=caller_outside_skid(),
                )
                return facs, widths
            for (method, precision), idx in finer.items():
                sub_key = None if key is None else fingerprint(key, method, precision, idx)
                finer_facs = source.statistics(sub_key, [units[i] for i in idx], method=method,
                                               precision=precision, warn=False)
                finer_facs = self.for_objective(source.work, [units[i] for i in idx],
                                                finer_facs)
                for i, fac in zip(idx, finer_facs, strict=True):
                    facs[i], routes[i] = fac, (method, precision)
                    if tol is not None:
                        widths[i] = _policy.width_for_tol(fac.errors, tol)

    # -------------------------------------------------------------------------- selections

    def selections_from(self, source, unit, fac, ks, key) -> list:
        """``unit``'s selections from its statistics ``fac``, one per width of ``ks`` (None:
        the fit's width rule). A width the route does not resolve is recomputed on a finer
        one first; with several widths, at the widest (the most demanding)."""
        fac, ks = self.resolved(source, unit, fac, ks, key)
        return [select(unit, fac, k) for k in ks]

    def resolved(self, source, unit, fac, ks, key):
        """:meth:`selections_from` up to the selections: the factorization as the objective
        reads it, on a route that resolves the widths, and the widths — each may then be
        selected on its own thread (no calibration pass is left)."""
        (fac,) = self.for_objective(source.work, [unit], [fac])
        rule = ks is None
        if rule:
            ks = [self.widths([fac], [unit])[0]]
        (fac,), (k,) = self.recheck(source, [unit], [fac], [max(ks)], key)
        if rule:
            ks = [k]  # a tol width, chosen again from the finer errors
        return fac, ks

    def plain_selection(self, source, unit, k, key) -> Selection:
        """``unit``'s ID from the model ``source`` runs, at width ``k`` (None: the rule)."""
        (fac,) = source.statistics(key, [unit])
        return self.selections_from(source, unit, fac, None if k is None else [k], key)[0]

    def corrective_selection(self, source, unit, k, key, selection) -> Selection:
        """One unit's corrective selection at width ``k`` (None: from this fit's rule);
        ``selection`` is how ``J`` is chosen (:data:`skid._corrective.SELECTIONS`)."""
        if not unit_kind(unit).fits_corrective:  # e.g. a rotation: nothing to fit
            return self.plain_selection(source, unit, k, key)
        if not _corrective_applies(unit):
            return self._corrective_group(source, unit, k, key)
        stats = source.corrective(key, unit)
        fac = self.settings.objective.corrective_factorization(source.work, unit, stats,
                                                               selection)
        k = self.widths([fac], [unit])[0] if k is None else k
        return select(unit, fac, k)

    def _corrective_group(self, source, unit, k, key) -> Selection:
        """A group read as several tensors, as slices of a concatenation or by a grouped
        convolution: ``J`` from the compressed model's statistics of all its readings (as
        ``"sequential"`` chooses it), then each reading's ``T`` fitted to the original model's
        reading by least squares (block-diagonal for a grouped convolution)."""
        (fac,) = source.statistics(key, [unit], warn=False)
        (fac,) = self.for_objective(source.work, [unit], [fac])
        k = self.widths([fac], [unit])[0] if k is None else k
        keep = np.asarray(fac.select(int(k))[0], dtype=np.int64)
        per_reading, squared = {}, []
        for consumer in reading_consumers(unit):
            sub = None if key is None else fingerprint(key, "reads", consumer.reads)
            stats = source.corrective(sub, unit, consumer)
            T, error = _corrective.fit_kept(stats, keep, unit.blocks)
            per_reading[consumer.reads] = torch.as_tensor(T)
            squared.append(error**2)
        per_consumer = tuple(per_reading[c.reads] for c in unit.consumers)
        return Selection(
            unit=unit, keep=torch.as_tensor(keep), interpolation=per_consumer[0],
            error=reading_error(squared, unit_kind(unit).sums_readings),
            interpolations=per_consumer if unit.n_readings > 1 else None,
        )


# ------------------------------------------------------------------------------- one pass


def plan_one_pass(settings, work, units, batches, key, cache, flops_info) -> Plan:
    """Statistics → widths → selections over the whole model, applied to ``work``.

    ``"original"``: every unit from one pass. Otherwise units in forward order, each folded
    before the next is calibrated; ``target_flops`` widths come from a first, original pass.
    """
    calibration = settings.calibration
    planner = Planner(settings, units, flops_info)
    reference = sharing_copy(work) if calibration.needs_reference else None
    source = StatisticsSource(work, batches, cache, settings, reference)
    widths = None
    # a FLOP budget or one width per kind needs every unit's curve first
    if not calibration.follows_compression or settings.target_flops is not None or (
            settings.uniform):
        facs = planner.for_objective(work, units, source.statistics(key, units))
        widths = planner.widths(facs, units, work, source, key)
        if not calibration.follows_compression:
            facs, widths = planner.recheck(source, units, facs, widths, key)
            selections = [select(u, f, k) for u, f, k in zip(units, facs, widths, strict=True)]
            for selection in selections:
                apply(work, selection)
            return Plan(tuple(selections), source.n_samples)
    selections = []
    for i, unit in enumerate(units):
        step_key = None if key is None else fingerprint(
            key, type(calibration).__name__, i, plan_content(selections))
        k = None if widths is None else widths[i]
        selection = calibration.unit_selection(planner, source, unit, k, step_key)
        apply(work, selection)
        source.changed = True
        selections.append(selection)
    return Plan(tuple(selections), source.n_samples)


# ---------------------------------------------------------------------------------- helpers


def plain_index(candidates, plain) -> int | None:
    """Where the plain uniform cut ``plain`` is among ``candidates`` (None: not there)."""
    if plain is None:
        return None
    return next((i for i, c in enumerate(candidates) if np.array_equal(c, plain)), None)


def select(unit, fac, k):
    """The plan record of ``unit`` kept at width ``k``."""
    return unit_kind(unit).select(unit, fac, k)


def apply(model, selection) -> None:
    """Fold ``selection`` into ``model`` in place."""
    unit_kind(selection.unit).apply(model, selection)


def plan_content(selections) -> list:
    """What the selections applied so far changed, for a content key."""
    return [[repr(s.unit), s.keep, s.interpolation, list(s.interpolations or ())]
            for s in selections]


def _corrective_applies(unit) -> bool:
    """Whether one corrective statistic gives the unit's selection: all consumers read one
    whole tensor (no concatenation slice) and no grouped convolution asks for a block-diagonal
    ``T`` (attention heads: the output projection's input). Other groups take
    :meth:`Planner._corrective_group`."""
    return unit.n_readings == 1 and unit.blocks == 1 and not any(
        c.before for c in unit.consumers)


def caller_outside_skid() -> int:
    """The ``stacklevel`` that makes a warning point at the first caller outside skid."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(package):
        frame, level = frame.f_back, level + 1
    return level


def _warn_few_rows(units, facs) -> None:
    """Warn for every unit whose statistic saw fewer rows than it has channels."""
    for unit, fac in zip(units, facs, strict=True):
        rows = getattr(fac, "n_samples", None)
        if rows is not None and rows < unit.width:
            warnings.warn(
                f"The unit {unit.producer!r} → {unit.consumer!r} has {unit.width} channels but "
                f"saw only {rows} calibration rows (samples × positions): at most {rows} "
                "channels are fitted to the data, and the rest of the kept channels only copy "
                f"themselves. Calibrate on at least {unit.width} rows.",
                UserWarning,
                stacklevel=caller_outside_skid(),
            )
