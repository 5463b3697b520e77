"""Block-wise calibration: one repeated block (a transformer layer) at a time.

A model's *blocks* are the members of an ``nn.ModuleList`` that run one after another, each on
the previous one's output (HF decoder/encoder layers). Calibrating block by block holds only
that block's statistics, and only that block needs to be on the calibration device:

* every member except the current one is swapped for a :class:`_Replay` that hands back the
  previous block's outputs, cached on the host for every calibration batch (the *tape*), so a
  pass costs the code around the blocks (embeddings, masks) plus one block;
* the block's units get their statistics from those inputs (``unit_statistics`` with the
  model's own code computing every extra argument: masks, rotary embeddings), then a second
  pass records the block's outputs — of the original block for ``calibration="original"``,
  of the compressed one for ``"sequential"`` — as the next tape;
* units outside the blocks are calibrated before them (those whose consumer runs before the
  first block) or after them, with every member replayed.

With ``calibration="original"`` the statistics are those of one pass over the whole model, so
the result is the same. Statistics of each step go through the compressor's cache, keyed per
block, so an interrupted run with ``memory=`` resumes without recomputing them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools

import numpy as np
import torch
from torch import nn

from .._validation import suggest
from ._calibration import (
    _StopForward,
    fingerprint,
    model_device_dtype,
    run_model,
    running_to_the_end,
    to_inputs,
)
from ._trace import map_tensors

__all__ = ["BlockLayout", "blockwise_plan", "find_blocks"]


@dataclasses.dataclass(frozen=True)
class BlockLayout:
    """Where the units lie relative to a model's blocks (indices into the units list).

    Attributes
    ----------
    name : str
        Qualified name of the ``nn.ModuleList``.
    size : int
        Number of blocks.
    before, after : tuple of int
        Units outside the blocks whose consumer runs before / after the blocks.
    inside : tuple of tuple of int
        Per block, its units in forward order.
    """

    name: str
    size: int
    before: tuple[int, ...]
    after: tuple[int, ...]
    inside: tuple[tuple[int, ...], ...]


# --------------------------------------------------------------------------------- detection


def find_blocks(model: nn.Module, example, spec, units) -> BlockLayout | None:
    """The block layout of ``model`` for ``blocks=spec``; None when blocks are not used.

    ``spec`` is None (off), ``"auto"`` (the longest ``ModuleList`` that runs in sequence and
    that no unit straddles; None if there is none) or a qualified name (an error if that list
    does not qualify).
    """
    if spec is None:
        return None
    modules = dict(model.named_modules())
    if spec == "auto":
        candidates = [n for n, m in modules.items() if isinstance(m, nn.ModuleList) and len(m) > 1]
    else:
        if not isinstance(modules.get(spec), nn.ModuleList):
            what = "is not an nn.ModuleList" if spec in modules else "does not exist"
            hint = "" if spec in modules else suggest(spec, modules)
            raise ValueError(f"blocks={spec!r}: that module {what}{hint}.")
        candidates = [spec]
    if not candidates:
        return None
    calls = _record_calls(model, example, [modules[n] for n in candidates], units)
    best, reasons = None, {}
    for name in candidates:
        layout, reason = _layout(name, modules[name], calls, units)
        if layout is None:
            reasons[name] = reason
        elif best is None or layout.size > best.size:
            best = layout
    if best is None and spec != "auto":
        raise ValueError(f"blocks={spec!r} cannot be calibrated block by block: {reasons[spec]}")
    return best


def _record_calls(model, example, lists, units):
    """One forward pass on ``example`` recording every member's input/output, in call order.

    Returns ``(order, members)``: the call index of each module named by a unit (its first
    call) and, per ModuleList member (by identity), its list of ``(index, input, output)``.
    """
    names = {n for u in units for n in _unit_modules(u)}
    modules = dict(model.named_modules())
    counter = itertools.count()
    order, members, handles = {}, {}, []

    def on_call(name):
        def hook(module, args):
            order.setdefault(name, next(counter))

        return hook

    def on_member(module, args, kwargs, output):
        members.setdefault(id(module), []).append((next(counter), _first_input(args, kwargs),
                                                   output))

    try:
        for name in names:
            handles.append(modules[name].register_forward_pre_hook(on_call(name)))
        for member in (m for module_list in lists for m in module_list):
            handles.append(member.register_forward_hook(on_member, with_kwargs=True))
        args, kwargs = example
        with torch.no_grad():
            run_model(model, args, kwargs, what="first samples of the calibration data")
    finally:
        for handle in handles:
            handle.remove()
    return order, members


def _layout(name, module_list, calls, units):
    """``(BlockLayout, None)`` when the list's members run in sequence, else ``(None, why)``."""
    order, members = calls
    records = [members.get(id(m), []) for m in module_list]
    if any(len(r) != 1 for r in records):
        return None, "its members are not each called exactly once per forward pass."
    starts = [r[0][0] for r in records]
    if starts != sorted(starts):
        return None, "its members are not called in their order."
    for i in range(1, len(records)):
        previous = _first_tensor(records[i - 1][0][2])
        current = records[i][0][1]
        if current is not previous and not _same(current, previous):
            return None, (
                f"member {i} does not run on member {i - 1}'s output (the model transforms "
                "the hidden states between them)."
            )
    first_call = starts[0]
    inside = [[] for _ in module_list]
    before, after = [], []
    for index, unit in enumerate(units):
        homes = {_member_of(n, name) for n in _unit_modules(unit)}
        if len(homes) > 1:
            return None, f"the unit of {unit.producer!r} spans blocks or leaves its block."
        (home,) = homes
        if home is not None:
            inside[home].append(index)
        elif order.get(unit.consumer, first_call) < first_call:
            before.append(index)
        else:
            after.append(index)
    layout = BlockLayout(name, len(module_list), tuple(before), tuple(after),
                         tuple(tuple(i) for i in inside))
    return layout, None


def _emptied(T):
    """A new ``(0, m)`` array of ``T``'s kind (torch or NumPy), sharing no memory with it."""
    if isinstance(T, torch.Tensor):
        return T.new_empty((0, T.shape[1]))
    return np.empty((0, np.shape(T)[1]))


def _unit_modules(unit):
    """Every module a unit slices or folds into (duck-typed: one or several producers)."""
    names = [unit.producer, unit.consumer, *getattr(unit, "passthroughs", ())]
    names += list(getattr(unit, "producers", ()))
    names += [getattr(c, "name", c) for c in getattr(unit, "consumers", ())]
    names += [getattr(unit, "attention", None)]  # a head unit's attention block
    return [n for n in names if isinstance(n, str) and n]


def _member_of(module_name: str, list_name: str):
    """The index of the block that ``module_name`` lies in, or None."""
    prefix = f"{list_name}." if list_name else ""
    if not module_name.startswith(prefix):
        return None
    head = module_name[len(prefix):].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def _first_input(args, kwargs):
    for value in itertools.chain(args, kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    return None


def _first_tensor(output):
    from ._compressor import _first_tensor as first

    return first(output)


def _same(a, b) -> bool:
    return (
        isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
        and a.dtype == b.dtype and torch.equal(a, b)
    )


# ---------------------------------------------------------------------------------- running


class _Tape:
    """The cached outputs of one block, one entry per calibration batch (on the host)."""

    def __init__(self, outputs=None):
        self.outputs = outputs or []
        self.position = -1

    def rewind(self) -> None:
        self.position = -1

    def current(self, device):
        return map_tensors(self.outputs[self.position], lambda t: t.to(device))


class _Replay(nn.Module):
    """Stands in for a block member: returns the tape's entry for the current batch.

    The first member's replay advances the tape (members run once per batch, in order).
    """

    def __init__(self, tape: _Tape, advances: bool, device):
        super().__init__()
        self.tape, self.advances, self.device = tape, advances, device

    def forward(self, *args, **kwargs):
        if self.advances:
            self.tape.position += 1
        return self.tape.current(self.device)


def _keeping_outputs(outputs: list):
    """A forward hook that keeps the member's output on the host and ends the pass there."""

    def hook(module, args, output):
        outputs.append(map_tensors(output, lambda t: t.detach().to("cpu")))
        raise _StopForward

    return hook


def _move(module: nn.Module, device) -> None:
    """Move a block member (a seam tests use to watch which blocks are on the device)."""
    module.to(device)


class _Runner:
    """Keeps the trunk on ``device`` and swaps members in for their turn, replays otherwise."""

    def __init__(self, model, layout: BlockLayout, device, home):
        self.model, self.device, self.home = model, device, home
        self.list = model.get_submodule(layout.name)
        self.members = list(self.list)
        self.tape = _Tape()
        for i in range(len(self.members)):
            self.list[i] = _Replay(self.tape, i == 0, device)
        model.to(device)  # the trunk only: the members are out

    def turn(self, i: int):
        """Put member ``i`` (on the device) into its place; every other member replays."""
        _move(self.members[i], self.device)
        self.list[i] = self.members[i]

    def end_turn(self, i: int) -> None:
        self.list[i] = _Replay(self.tape, i == 0, self.device)
        _move(self.members[i], self.home)

    @contextlib.contextmanager
    def recording(self, i: int, wanted):
        """While on, statistics passes run past member ``i`` and keep its outputs (the next
        tape), so the block does not run a second time just to record them."""
        self._recorded = None
        if not wanted:
            yield
            return
        outputs = []
        handle = self.members[i].register_forward_hook(_keeping_outputs(outputs))
        try:
            with running_to_the_end():
                yield
        finally:
            handle.remove()
        self._recorded = outputs

    def recorded(self, i: int, batches) -> bool:
        """Whether the last statistics pass recorded member ``i``'s output for every batch
        (not when the statistics came from ``memory=``); if so, that is the tape now."""
        outputs, self._recorded = self._recorded, None
        if outputs is None or len(outputs) != batches.n_batches:
            return False
        self.tape.outputs = outputs
        return True

    def record(self, i: int, batches, dtype) -> None:
        """Run the model up to member ``i``'s output on every batch; that output is the tape."""
        outputs = []
        handle = self.members[i].register_forward_hook(_keeping_outputs(outputs))
        self.tape.rewind()
        try:
            with torch.no_grad():
                for batch in batches:
                    args, kwargs = to_inputs(batch, self.device, dtype)
                    try:
                        run_model(self.model, args, kwargs)
                    except _StopForward:
                        pass
        finally:
            handle.remove()
        self.tape.outputs = outputs

    def close(self) -> None:
        for i, member in enumerate(self.members):
            self.list[i] = member
        self.model.to(self.home)


# ----------------------------------------------------------------------------------- the plan


def blockwise_plan(nc, work, units, layout, batches, key, cache, flops_info, home):
    """Selections for every unit, calibrated block by block; applied to ``work``.

    ``nc`` is the fitting compressor (settings, ``_widths``); ``home`` is where ``work`` and the
    members wait (the device of the example inputs). Returns the selections in units order,
    each holding its interpolation matrix only until it is folded into ``work`` (an empty
    ``(0, width)`` tensor then), so the plan does not grow by a ``k × m`` matrix per unit.
    """
    device = home if nc.device is None else torch.device(nc.device)
    walk = _Walk(nc, work, units, batches, key, cache)
    if nc.target_flops is None:
        mode = "original" if nc.calibration == "original" else "sequential"
        walk.run(layout, device, home, mode)
        return walk.results
    walk.run(layout, device, home, "collect")  # every unit's error curve, for the FLOP budget
    facs, walk.results = walk.results, [None] * len(units)
    facs = nc._for_objective(work, units, facs)
    walk.widths = nc._widths(facs, units, flops_info, work, batches)
    if nc.calibration == "original":
        for i, fac in enumerate(facs):
            walk.select(i, fac, objective_applied=True)
            facs[i] = None
            walk.fold([i])
        return walk.results
    walk.run(layout, device, home, "sequential")
    return walk.results


class _Walk:
    """Calibrates the units of a block layout: before the blocks, block by block, after them.

    Modes: ``"collect"`` keeps every unit's factorization (for a global width rule);
    ``"original"`` selects from the original model's statistics and folds each block's
    selections once the block's outputs are recorded (the units outside the blocks at the
    end); ``"sequential"`` folds each unit before the next one is calibrated.
    """

    def __init__(self, nc, work, units, batches, key, cache):
        self.nc, self.work, self.units, self.batches = nc, work, units, batches
        self.key, self.cache = key, cache
        self.results = [None] * len(units)
        self.widths = None  # fixed widths (target_flops), else the compressor's per-unit rule
        self.state = key  # content key of what has been folded so far (sequential)

    def run(self, layout, device, home, mode) -> None:
        _, dtype = model_device_dtype(self.work)
        runner = _Runner(self.work, layout, device, home)
        try:
            self.calibrate(runner, layout.before, "before", mode)
            for b, indices in enumerate(layout.inside):
                runner.turn(b)
                try:
                    needed = b + 1 < layout.size or layout.after
                    # one pass: the statistics, and the block's outputs for the blocks after it
                    with runner.recording(b, needed and mode != "sequential" and indices):
                        self.calibrate(runner, indices, f"block {b}", mode)
                    if needed and not runner.recorded(b, self.batches):
                        runner.record(b, self.batches, dtype)
                    if mode == "original":
                        self.fold(indices)  # its outputs are recorded: fold, free the T's
                finally:
                    runner.end_turn(b)
            self.calibrate(runner, layout.after, "after", mode)
        finally:
            runner.close()
        if mode == "original":
            self.fold(layout.before + layout.after)

    def calibrate(self, runner, indices, tag, mode) -> None:
        """Statistics of ``indices`` (all at once, or one by one when sequential)."""
        steps = [[i] for i in indices] if mode == "sequential" else [list(indices)]
        for step in steps if indices else ():
            runner.tape.rewind()
            step_key = None if self.key is None else fingerprint(self.state, tag, step)
            nc = self.nc
            facs, nc.n_calibration_samples_ = self.cache.get(
                step_key, self.work, [self.units[i] for i in step], self.batches,
                method=nc.method_, precision=nc._gram_precision, verbose=nc.verbose,
            )
            from ._compressor import _warn_few_rows

            _warn_few_rows([self.units[i] for i in step], facs)
            for i, fac in zip(step, facs, strict=True):
                if mode == "collect":
                    self.results[i] = fac
                else:
                    unit_key = None if step_key is None else fingerprint(step_key, i)
                    self.select(i, fac, recheck=(mode == "original" and self.widths is None,
                                                 runner, unit_key))
            if mode == "sequential":
                self.fold(step, track=True)

    def select(self, i, fac, objective_applied=False, recheck=(False, None, None)) -> None:
        """Unit ``i``'s selection; with ``recheck``, a width the route does not resolve is
        recomputed on a finer one first, as the one-pass ``"original"`` fit does."""
        from ._compressor import _selection

        unit = self.units[i]
        if not objective_applied:
            (fac,) = self.nc._for_objective(self.work, [unit], [fac])
        k = self.widths[i] if self.widths is not None else self.nc._widths([fac], [unit], None)[0]
        wanted, runner, step_key = recheck
        if wanted:
            (fac,), (k,) = self.nc._recheck(self.work, [unit], [fac], [k], self.batches,
                                            step_key, self.cache,
                                            before_pass=runner.tape.rewind)
        self.results[i] = _selection(unit, fac, k)

    def fold(self, indices, track=False) -> None:
        """Apply the selections of ``indices`` to the model and drop their T's.

        ``track``: later statistics depend on this fold (sequential), so it enters their keys.
        """
        from ._compressor import _apply, _plan_content

        for i in indices:
            selection = self.results[i]
            _apply(self.work, selection)
            if track and self.key is not None:
                self.state = fingerprint(self.state, _plan_content([selection]))
            # new (0, m) arrays: a slice would be a view keeping the whole T alive
            changes = {"interpolation": _emptied(selection.interpolation)}
            if getattr(selection, "interpolations", None) is not None:
                changes["interpolations"] = tuple(map(_emptied, selection.interpolations))
            self.results[i] = dataclasses.replace(selection, **changes)
