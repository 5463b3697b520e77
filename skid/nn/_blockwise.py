"""The block-wise driver: the planner's modes over a replay of one block at a time.

:mod:`skid.nn._blocks` provides the tapes and runners (every member but the current one
replays its cached outputs); this module walks a :class:`skid.nn._blocks.BlockLayout` with
them (consecutive blocks with small statistics in one pass where the walk allows it:
:func:`shared_passes`) and asks the :class:`skid.nn._planner.Planner` for every selection,
through a statistics source that rewinds the tapes before each pass — so each calibration
mode is written once, in the planner and its :class:`skid.nn._objectives.Calibration`, for
one pass and block-wise.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import nn

from . import _distributed, _sensitivity
from ._batches import model_device_dtype
from ._blocks import Runner
from ._calibration import fingerprint, reading_consumers, statistic_width
from ._outputs import batch_outputs, output_distance
from ._parallel import map_units
from ._planner import (
    Plan,
    Planner,
    StatisticsSource,
    apply,
    plain_index,
    plan_content,
    select,
)
from ._surgery import sharing_copy
from ._tapes import TapeStore

__all__ = ["SHARED_PASS_BYTES", "ErrorCurve", "blockwise_plan", "shared_passes"]


class ErrorCurve:
    """What a FLOP budget needs of a unit's factorization, and nothing more: its relative
    error at every width and, for heads, the counts the model's code runs.

    ``target_flops`` compares every unit's curve at once; keeping these instead of the
    factorizations (an ``m × m`` factor each) is what keeps the statistics to one block.
    """

    def __init__(self, fac):
        self.errors = np.array(fac.errors, dtype=np.float64)
        self.n_features = fac.n_features
        self.valid_counts = getattr(fac, "valid_counts", None)
        self._valid = None if self.valid_counts is None else [
            fac.valid(k) for k in range(len(self.errors))]

    def valid(self, k: int) -> int:
        return self._valid[int(k)]


def blockwise_plan(settings, work, units, layout, batches, key, cache, flops_info,
                   home) -> Plan:
    """Selections for every unit, calibrated block by block; applied to ``work``.

    ``home`` is where ``work`` and the members wait (the device of the example inputs).
    Returns the selections in units order, each holding its interpolation matrix only until
    it is folded into ``work`` (an empty ``(0, width)`` tensor then), so the plan does not grow
    by a ``k × m`` matrix per unit.

    ``target_flops`` weighs every unit against every other: a first walk keeps each unit's
    :class:`ErrorCurve` (its statistics are freed block by block), a second measures each
    unit's output weight (:func:`_output_weights`), the budget gives candidate widths from
    these original-model curves (as a one-pass fit does for every calibration), and a third
    walk folds them — building every candidate side by side when there are several, each in
    its own copy of the model (sharing the model's tensors: it costs the candidate's folded
    weights), fitted without the first calibration batch, so that the one whose outputs on
    that batch stay closest is kept, as a one-pass fit decides. A last walk fits the chosen
    widths on every row (with a calibration that follows the compression, as it). With
    ``memory=`` the later walks read the statistics back.
    """
    device = home if settings.device is None else settings.device
    calibration = settings.calibration
    planner = Planner(settings, units, flops_info)

    def walk(targets, mode, widths=None, data=(batches, key)):
        w = _Walk(planner, targets, units, *data, cache, widths)
        return w.run(layout, device, home, mode), w.source.n_samples

    uniform_tol = settings.uniform and settings.target_flops is None and settings.rank is None
    if settings.target_flops is None and not uniform_tol:
        (selections,), n = walk([work], calibration)
        return Plan(tuple(selections), n)
    (curves,), _ = walk([work], _COLLECT)
    split, judge, held_out, plain = None, batches.first, (batches, key), None
    if uniform_tol:  # one width per kind of repeated unit needs every unit's curve first
        candidates = [planner.widths(curves, units)]
    else:
        # as one pass does (Planner.faithful_widths): the candidates' folds are fitted
        # without the held-out rows that judge them, the greedy's curves weighted by their
        # output effects
        split = _sensitivity.split_held_out(batches)
        rest, judge = split if split is not None else (batches,
                                                       _sensitivity.held_out_batch(batches))
        held_out = (rest, key if key is None or split is None else fingerprint(key, "held out"))
        weights = None if settings.uniform else _output_weights(planner, work, units, curves,
                                                                 walk, held_out, home)
        candidates = planner.flops_candidates(curves, units, work, weights)
        if not settings.uniform:
            (plain,) = planner.flops_candidates(curves, units, work, plain=True)
            plain = plain_index(candidates, plain)
    del curves
    batched = not calibration.follows_compression and split is None
    if len(candidates) > 1:
        reference = batch_outputs(work, judge)
        pristine = None if batched else sharing_copy(work)
        targets = [work] + [sharing_copy(work) for _ in candidates[1:]]
        plans, n = walk(targets, _ORIGINAL, candidates, held_out)
        for target in targets[1:]:
            target.to(home)  # what was folded into a copy during its block's turn
        best = _sensitivity.most_faithful(
            [_sensitivity.output_gap(target, reference, judge) for target in targets], plain)
        del targets[1:best], targets[best + 1:]  # the losers' models go now
        _transplant(work, targets[-1] if batched else pristine)
        if batched:
            return Plan(tuple(plans[best]), n)
        candidates = [candidates[best]]
    (selections,), n = walk([work], calibration, candidates)
    return Plan(tuple(selections), n)


def _output_weights(planner, work, units, curves, walk, data, home):
    """:func:`skid.nn._sensitivity.output_weights` block-wise: the budget has only the error
    curves here, so one more walk (over ``data``, the rows the candidates are fitted with)
    builds side by side a copy per unit with that unit alone cut to the uniform width (the
    others folded at full width); None with a single unit."""
    if len(units) < 2:
        return None
    (uniform,) = planner.flops_candidates(curves, units, work, plain=True)
    full = np.array([u.width for u in units], dtype=np.int64)
    cut = [i for i in range(len(units)) if uniform[i] < full[i]]
    weights = np.full(len(units), np.nan)
    if cut:
        trials = [sharing_copy(work) for _ in cut]
        plans, _ = walk(trials, _ORIGINAL,
                        [np.where(np.arange(len(units)) == i, uniform, full) for i in cut],
                        data)
        batch = data[0].first
        reference = batch_outputs(work, batch)
        for i, trial, plan in zip(cut, trials, plans, strict=True):
            trial.to(home)
            error = float(plan[i].error)
            if error > 0:
                weights[i] = output_distance(trial, reference, batch) ** 2 / error**2
    return _sensitivity.measured(weights)


def _transplant(target: nn.Module, source: nn.Module) -> None:
    """Make ``target`` (the fit's own model object, which the caller holds) compute what
    ``source`` (a deep copy of it, compressed otherwise) computes: take its children."""
    if target is source:
        return
    for name, child in source.named_children():
        setattr(target, name, child)


#: Statistics (their Grams, float64) that consecutive blocks may hold together in one pass
#: when the walk's selections come from one pass per block anyway (``"original"`` and the
#: FLOP budget's walks, no ``device`` or ``memory``): their statistics are the one pass's
#: whatever the grouping, and a pass that replays the finished blocks costs the code around
#: the blocks again (the benchmark LLaMA's second pass: 16–24 ms of a 0.3–0.4 s fit), while
#: the units of several blocks factorize side by side (MiniLM's fit: 0.45 s of 7 s, two
#: threads). Blocks as wide as an LLM's (one 8B layer's MLP Gram is 1.5 GiB) keep a pass each.
SHARED_PASS_BYTES = 64 << 20


def shared_passes(layout, units) -> list:
    """The blocks of ``layout`` in consecutive groups that share a statistics pass: each as
    many blocks as hold at most :data:`SHARED_PASS_BYTES` of statistics together (a block
    over it alone)."""
    groups, held = [], 0
    for b, indices in enumerate(layout.inside):
        size = sum(8 * statistic_width(units[i]) ** 2 * len(reading_consumers(units[i]))
                   for i in indices)
        if groups and held + size <= SHARED_PASS_BYTES:
            groups[-1].append(b)
            held += size
        else:
            groups.append([b])
            held = size
    return [tuple(group) for group in groups]


#: Walk modes besides a calibration: every unit's error curve (for a global width rule), and
#: candidate widths side by side on the original model's statistics.
_COLLECT, _ORIGINAL = "collect", "original"


class _ReplaySource(StatisticsSource):
    """The statistics of a block layout's units: every pass replays the tapes from the
    start (``rewind``), so only the current block runs."""

    def __init__(self, walk, settings):
        super().__init__(walk.work, walk.batches, walk.cache, settings)
        self._walk = walk

    def rewind(self) -> None:
        self._walk.rewind()


class _Walk:
    """Calibrates the units of a block layout: before the blocks, block by block, after them.

    ``mode`` is a :class:`~skid.nn._objectives.Calibration` or one of the two walks of a
    FLOP budget: ``_COLLECT`` keeps every unit's :class:`ErrorCurve`; ``_ORIGINAL`` selects
    every target's widths from the original model's statistics. A calibration that does not
    follow the compression (and these two) selects from one statistics pass per block and
    folds each block's selections once its outputs are recorded (the units outside the
    blocks at the end); one that does folds each unit before the next one is calibrated —
    with a reference (``"corrective"``), a copy of the original walks beside the model with a
    tape of its own (two blocks are on the device at a time).

    ``targets`` are the models the selections fold into, one per entry of ``widths``
    (candidate widths per unit, or None for the fit's own per-unit rule); the first is the
    model the walk runs. Several targets need ``_ORIGINAL``.
    """

    def __init__(self, planner, targets, units, batches, key, cache, widths=None):
        self.planner, self.targets, self.units, self.batches = planner, targets, units, batches
        self.work = targets[0]
        self.key, self.cache = key, cache
        self.widths = widths
        self.results = [[None] * len(units) for _ in targets]
        self.state = key  # content key of what has been folded so far (sequential)
        self.reference = None  # the original model beside the work (corrective)
        self.runners = []
        self.source = _ReplaySource(self, planner.settings)

    def run(self, layout, device, home, mode) -> list:
        """Walk the layout; the selections (or curves) of each target, in units order."""
        batched = mode in (_COLLECT, _ORIGINAL) or not mode.follows_compression
        if len(self.targets) > 1 and mode != _ORIGINAL:
            raise RuntimeError("Internal error: side-by-side candidates need the original.")
        with_reference = not batched and mode.needs_reference
        _, dtype = model_device_dtype(self.work)
        store = TapeStore(self.cache.memory)
        if with_reference:
            self.reference = sharing_copy(self.work)  # before the runner swaps members out
            self.source.reference = self.reference
        runner = Runner(self.work, layout, device, home, store)
        self.runners = [runner]
        try:
            if with_reference:
                self.runners.append(Runner(self.reference, layout, device, home, store))
            self.calibrate(layout.before, "before", mode, batched)
            # blocks share passes unless they are moved in one at a time (device=) or
            # their statistics and tapes are kept per block (memory=)
            shared = batched and self.key is None and self.planner.settings.device is None
            for group in shared_passes(layout, self.units) if shared else (
                    (b,) for b in range(layout.size)):
                b = group[-1]  # the group's last block: its outputs are the next tape
                indices = tuple(i for g in group for i in layout.inside[g])
                for g in group:
                    for r in self.runners:
                        r.turn(g)
                try:
                    needed = b + 1 < layout.size or layout.after
                    # one pass: the statistics, and the block's outputs for the blocks after it
                    with runner.recording(b, needed and batched and indices,
                                          self.tape_key(b, batched)):
                        self.calibrate(indices, f"block {b}", mode, batched)
                    if needed and not runner.recorded(b, self.batches):
                        # keyed after the block's folds: sequential records what they made
                        runner.record(b, self.batches, dtype, self.tape_key(b, batched))
                    if needed and with_reference:  # the original block's outputs
                        self.runners[1].record(b, self.batches, dtype, self.tape_key(b, True))
                    if batched and mode != _COLLECT:
                        self.fold(indices)  # its outputs are recorded: fold, free the T's
                finally:
                    for g in group:
                        for r in self.runners:
                            r.end_turn(g)
            self.calibrate(layout.after, "after", mode, batched)
        finally:
            for r in self.runners:
                r.close()
            self.runners, self.reference = [], None
            self.source.reference = None
        if batched and mode != _COLLECT:
            self.fold(layout.before + layout.after)
        return self.results

    def rewind(self) -> None:
        """Replay every tape from its first batch (before a statistics pass)."""
        for r in self.runners:
            r.tape.rewind()

    def tape_key(self, b: int, original: bool):
        """Content key of block ``b``'s recorded outputs (None without ``memory=``): those of
        the original block, or (sequential) of the block as compressed so far."""
        if self.key is None:
            return None
        state = self.key if original else self.state
        return fingerprint(state, "block outputs", b, _distributed.rank_and_size())

    def calibrate(self, indices, tag, mode, batched) -> None:
        """Selections (or curves) of ``indices``: from one statistics pass when ``batched``,
        else one unit at a time, each folded before the next is calibrated."""
        if not indices:
            return
        planner, units = self.planner, self.units
        if not batched:
            for i in indices:
                step_key = None if self.key is None else fingerprint(
                    self.state, tag, i, type(mode).__name__)
                k = None if self.widths is None else self.widths[0][i]
                self.results[0][i] = mode.unit_selection(planner, self.source, units[i], k,
                                                         step_key)
                self.fold([i], track=True)
            return
        step = list(indices)
        step_key = None if self.key is None else fingerprint(self.state, tag, step)
        facs = self.source.statistics(step_key, [units[i] for i in step])
        resolved = []
        for i, fac in zip(step, facs, strict=True):
            if mode == _COLLECT:
                (fac,) = planner.for_objective(self.work, [units[i]], [fac])
                self.results[0][i] = ErrorCurve(fac)
                continue
            unit_key = None if step_key is None else fingerprint(step_key, i)
            ks = None if self.widths is None else [c[i] for c in self.widths]
            resolved.append((i, *planner.resolved(self.source, units[i], fac, ks, unit_key)))
        # the selections (T solves, head greedy) of the units, side by side where wide enough
        chosen = map_units(lambda job: [select(units[job[0]], job[1], k) for k in job[2]],
                           resolved, [statistic_width(units[i]) for i, _, _ in resolved])
        for (i, _, _), selections in zip(resolved, chosen, strict=True):
            for results, selection in zip(self.results, selections, strict=True):
                results[i] = selection

    def fold(self, indices, track=False) -> None:
        """Apply the selections of ``indices`` to the targets and drop their T's.

        ``track``: later statistics depend on this fold (sequential), so it enters their keys.
        """
        for target, results in zip(self.targets, self.results, strict=True):
            for i in indices:
                selection = results[i]
                apply(target, selection)
                if track:
                    self.source.changed = True
                    if self.key is not None:
                        self.state = fingerprint(self.state, plan_content([selection]))
                # new (0, m) arrays: a slice would be a view keeping the whole T alive
                changes = {"interpolation": _emptied(selection.interpolation)}
                if getattr(selection, "interpolations", None) is not None:
                    changes["interpolations"] = tuple(map(_emptied, selection.interpolations))
                results[i] = dataclasses.replace(selection, **changes)


def _emptied(T):
    """A new ``(0, m)`` array of ``T``'s kind (torch or NumPy), sharing no memory with it."""
    if isinstance(T, torch.Tensor):
        return T.new_empty((0, T.shape[1]))
    return np.empty((0, np.shape(T)[1]))
