"""Block-wise calibration: one repeated block (a transformer layer) at a time.

A model's *blocks* are the members of an ``nn.ModuleList`` that run one after another, each on
the previous one's output (HF decoder/encoder layers). Calibrating block by block holds only
that block's statistics, and only that block needs to be on the calibration device:

* every member except the current one is swapped for a :class:`_Replay` that hands back the
  previous block's outputs, cached for every calibration batch (the *tape*: on the host, or
  with ``memory=`` as files under its folder), so a pass costs the code around the blocks
  (embeddings, masks) plus one block;
* the block's units get their statistics from those inputs (``unit_statistics`` with the
  model's own code computing every extra argument: masks, rotary embeddings); the same pass
  records the block's outputs as the next tape (``"original"``), or a pass after its units
  are folded records those of the compressed block (``"sequential"``);
* units outside the blocks are calibrated before them (those whose consumer runs before the
  first block) or after them, with every member replayed.

With ``calibration="original"`` the statistics are those of one pass over the whole model, so
the result is the same. Statistics and tapes go through ``memory=``, keyed per block, so an
interrupted run resumes without recomputing them or running the finished blocks again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import shutil
import uuid

import numpy as np
import torch
from torch import nn

from .._validation import suggest
from . import _distributed
from ._calibration import (
    _StopForward,
    fingerprint,
    model_device_dtype,
    run_model,
    running_to_the_end,
    to_inputs,
)
from ._surgery import sharing_copy
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
    """The cached outputs of one block, one entry per calibration batch: on the host, or
    files (``torch.save``, read back one batch at a time) in a :class:`_TapeStore` folder."""

    def __init__(self, outputs=None):
        self.outputs = outputs or []
        self.position = -1

    def rewind(self) -> None:
        self.position = -1

    def current(self, device):
        entry = self.outputs[self.position]
        if isinstance(entry, str):  # a file of the store
            return torch.load(entry, map_location=device, weights_only=True)
        return map_tensors(entry, lambda t: t.to(device))


class _TapeStore:
    """Block outputs on disk, under ``memory=``'s folder, by content key.

    A tape is written into a fresh folder and renamed into place once every batch is in, so
    a folder under its key is always complete: an interrupted run leaves no half tape, and a
    resumed one replays the finished blocks' outputs instead of running them again.
    ``memory.clear()`` removes them with the statistics.
    """

    def __init__(self, memory):
        backend = getattr(memory, "store_backend", None)
        location = getattr(backend, "location", None)
        self.root = None if location is None else os.path.join(location, "skid_block_outputs")

    def folder(self, key):
        return None if self.root is None or key is None else os.path.join(self.root, key)

    def load(self, key, n_batches: int):
        """The stored tape under ``key`` (a list of file names), or None."""
        folder = self.folder(key)
        if folder is None or not os.path.isdir(folder):
            return None
        files = [os.path.join(folder, f"{i}.pt") for i in range(n_batches)]
        return files if all(map(os.path.isfile, files)) else None


class _Recorder:
    """Takes a block's output for each batch: kept on the host, or written into a new
    folder that :meth:`finish` renames to the tape's key (``folder`` None: host)."""

    def __init__(self, folder=None):
        self.final = folder
        self.folder = None if folder is None else f"{folder}.{os.getpid()}.{uuid.uuid4().hex}"
        if self.folder is not None:
            os.makedirs(self.folder)
        self.outputs = []

    def append(self, output) -> None:
        output = map_tensors(output, lambda t: t.detach().to("cpu"))
        if self.folder is None:
            self.outputs.append(output)
            return
        path = os.path.join(self.folder, f"{len(self.outputs)}.pt")
        torch.save(output, path)
        self.outputs.append(path)

    def finish(self, n_batches: int):
        """The tape's entries once all ``n_batches`` are in (else None, and nothing kept)."""
        complete = len(self.outputs) == n_batches
        if self.folder is None:
            return self.outputs if complete else None
        if complete:
            try:
                os.replace(self.folder, self.final)
            except OSError:  # another process stored the same tape first: use that one
                shutil.rmtree(self.folder, ignore_errors=True)
            names = [os.path.basename(p) for p in self.outputs]
            return [os.path.join(self.final, n) for n in names]
        shutil.rmtree(self.folder, ignore_errors=True)
        return None


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


def _keeping_outputs(recorder: _Recorder):
    """A forward hook that hands the member's output to ``recorder`` and ends the pass there."""

    def hook(module, args, output):
        recorder.append(output)
        raise _StopForward

    return hook


def _move(module: nn.Module, device) -> None:
    """Move a block member (a seam tests use to watch which blocks are on the device)."""
    module.to(device)


class _Runner:
    """Keeps the trunk on ``device`` and swaps members in for their turn, replays otherwise."""

    def __init__(self, model, layout: BlockLayout, device, home, store: _TapeStore):
        self.model, self.device, self.home, self.store = model, device, home, store
        self.list = model.get_submodule(layout.name)
        self.members = list(self.list)
        self.tape = _Tape()
        self._recorder = None
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
    def recording(self, i: int, wanted, key=None):
        """While on, statistics passes run past member ``i`` and keep its outputs (the next
        tape, stored under ``key`` with ``memory=``), so the block does not run a second time
        just to record them."""
        self._recorder = None
        if not wanted:
            yield
            return
        recorder = _Recorder(self.store.folder(key))
        handle = self.members[i].register_forward_hook(_keeping_outputs(recorder))
        try:
            with running_to_the_end():
                yield
        finally:
            handle.remove()
        self._recorder = recorder

    def recorded(self, i: int, batches) -> bool:
        """Whether the last statistics pass recorded member ``i``'s output for every batch
        (not when the statistics came from ``memory=``); if so, that is the tape now."""
        recorder, self._recorder = self._recorder, None
        outputs = None if recorder is None else recorder.finish(batches.n_batches)
        if outputs is None:
            return False
        self.tape.outputs = outputs
        return True

    def record(self, i: int, batches, dtype, key=None) -> None:
        """Member ``i``'s output on every batch becomes the tape: read back from ``memory=``
        when a run stored it under ``key``, else recorded by running the model up to it."""
        stored = self.store.load(key, batches.n_batches)
        if stored is not None:
            self.tape.outputs = stored
            return
        recorder = _Recorder(self.store.folder(key))
        handle = self.members[i].register_forward_hook(_keeping_outputs(recorder))
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
        outputs = recorder.finish(batches.n_batches)
        if outputs is None:
            raise RuntimeError(f"Internal error: block {i} did not run on every batch.")
        self.tape.outputs = outputs

    def close(self) -> None:
        for i, member in enumerate(self.members):
            self.list[i] = member
        self.model.to(self.home)


# ----------------------------------------------------------------------------------- the plan


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


def blockwise_plan(nc, work, units, layout, batches, key, cache, flops_info, home):
    """Selections for every unit, calibrated block by block; applied to ``work``.

    ``nc`` is the fitting compressor (settings, ``_widths``); ``home`` is where ``work`` and the
    members wait (the device of the example inputs). Returns the selections in units order,
    each holding its interpolation matrix only until it is folded into ``work`` (an empty
    ``(0, width)`` tensor then), so the plan does not grow by a ``k × m`` matrix per unit.

    ``target_flops`` weighs every unit against every other: a first walk keeps each unit's
    :class:`ErrorCurve` (its statistics are freed block by block), the budget gives candidate
    widths from these original-model curves (as a one-pass fit does for every calibration),
    and a second walk folds them — building every candidate side by side when there are
    several, each in its own copy of the model (sharing the model's tensors: it costs the
    candidate's folded weights), so that the one whose outputs on the first batch stay closest
    is kept, as a one-pass fit decides. ``"sequential"`` then walks a third time with the
    chosen widths, as does ``"corrective"``. With ``memory=`` the later walks read the
    statistics back.
    """
    from ._compressor import batch_outputs, output_distance
    from ._sensitivity import blockwise_candidates

    device = home if nc.device is None else torch.device(nc.device)
    mode = nc.calibration
    if nc.target_flops is None:
        return _Walk(nc, [work], units, batches, key, cache).run(layout, device, home, mode)[0]
    curves = _Walk(nc, [work], units, batches, key, cache).run(layout, device, home,
                                                                "collect")[0]
    # output weights and held-out rows, as a one-pass fit (skid/nn/_sensitivity.py)
    candidates, rest, rest_key, judge = blockwise_candidates(
        nc, work, units, layout, (batches, key, cache), curves, flops_info, (device, home))
    del curves
    if len(candidates) > 1:
        reference = batch_outputs(work, judge)
        refit = mode != "original" or rest is not batches  # built without some rows
        pristine = sharing_copy(work) if refit else None
        targets = [work] + [sharing_copy(work) for _ in candidates[1:]]
        plans = _Walk(nc, targets, units, rest, rest_key, cache, candidates).run(
            layout, device, home, "original")
        for target in targets[1:]:
            target.to(home)  # what was folded into a copy during its block's turn
        best = min(range(len(targets)),
                   key=lambda c: output_distance(targets[c], reference, judge))
        del targets[1:best], targets[best + 1:]  # the losers' models go now
        _transplant(work, pristine if refit else targets[-1])
        if not refit:
            return plans[best]
        candidates = [candidates[best]]
    return _Walk(nc, [work], units, batches, key, cache, candidates).run(
        layout, device, home, mode)[0]


def _transplant(target: nn.Module, source: nn.Module) -> None:
    """Make ``target`` (the fit's own model object, which the caller holds) compute what
    ``source`` (a deep copy of it, compressed otherwise) computes: take its children."""
    if target is source:
        return
    for name, child in source.named_children():
        setattr(target, name, child)


class _Walk:
    """Calibrates the units of a block layout: before the blocks, block by block, after them.

    Modes: ``"collect"`` keeps every unit's :class:`ErrorCurve` (for a global width rule);
    ``"original"`` selects from the original model's statistics and folds each block's
    selections once the block's outputs are recorded (the units outside the blocks at the
    end); ``"sequential"`` folds each unit before the next one is calibrated;
    ``"corrective"`` too, each ``T`` fitted to the original model's activations: a copy of
    the original walks beside the model with a tape of its own (two blocks are on the device
    at a time, the block as compressed so far and the original).

    ``targets`` are the models the selections fold into, one per entry of ``widths``
    (candidate widths per unit, or None for the compressor's own per-unit rule); the first
    is the model the walk runs. Several targets need ``"original"`` (the statistics of
    the first model's original blocks serve them all).
    """

    def __init__(self, nc, targets, units, batches, key, cache, widths=None):
        self.nc, self.targets, self.units, self.batches = nc, targets, units, batches
        self.work = targets[0]
        self.key, self.cache = key, cache
        self.widths = widths
        self.results = [[None] * len(units) for _ in targets]
        self.state = key  # content key of what has been folded so far (sequential)
        self.tracked = 0  # units folded so far (sequential, corrective)
        self.reference = None  # the original model beside the work (corrective)
        self.runners = []

    def run(self, layout, device, home, mode) -> list:
        """Walk the layout; the selections (or curves) of each target, in units order."""
        if len(self.targets) > 1 and mode != "original":
            raise RuntimeError("Internal error: side-by-side candidates need 'original'.")
        _, dtype = model_device_dtype(self.work)
        store = _TapeStore(self.cache.memory)
        if mode == "corrective":
            self.reference = sharing_copy(self.work)  # before the runner swaps members out
        runner = _Runner(self.work, layout, device, home, store)
        self.runners = [runner]
        try:
            if mode == "corrective":
                self.runners.append(_Runner(self.reference, layout, device, home, store))
            self.calibrate(runner, layout.before, "before", mode)
            for b, indices in enumerate(layout.inside):
                for r in self.runners:
                    r.turn(b)
                try:
                    needed = b + 1 < layout.size or layout.after
                    # one pass: the statistics, and the block's outputs for the blocks after it
                    with runner.recording(b, needed and mode in ("original", "collect")
                                          and indices, self.tape_key(b, mode)):
                        self.calibrate(runner, indices, f"block {b}", mode)
                    if needed and not runner.recorded(b, self.batches):
                        # keyed after the block's folds: sequential records what they made
                        runner.record(b, self.batches, dtype, self.tape_key(b, mode))
                    if needed and mode == "corrective":  # the original block's outputs
                        self.runners[1].record(b, self.batches, dtype,
                                               self.tape_key(b, "original"))
                    if mode == "original":
                        self.fold(indices)  # its outputs are recorded: fold, free the T's
                finally:
                    for r in self.runners:
                        r.end_turn(b)
            self.calibrate(runner, layout.after, "after", mode)
        finally:
            for r in self.runners:
                r.close()
            self.runners, self.reference = [], None
        if mode == "original":
            self.fold(layout.before + layout.after)
        return self.results

    def rewind(self) -> None:
        """Replay every tape from its first batch (before a statistics pass)."""
        for r in self.runners:
            r.tape.rewind()

    def tape_key(self, b: int, mode: str):
        """Content key of block ``b``'s recorded outputs (None without ``memory=``): those of
        the original block, or (sequential) of the block as compressed so far."""
        if self.key is None:
            return None
        state = self.key if mode in ("original", "collect") else self.state
        return fingerprint(state, "block outputs", b, _distributed.rank_and_size())

    def calibrate(self, runner, indices, tag, mode) -> None:
        """Statistics of ``indices`` (all at once, or one by one when sequential)."""
        if mode == "corrective":
            return self.correct(indices, tag)
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
                    (fac,) = nc._for_objective(self.work, [self.units[i]], [fac])
                    self.results[0][i] = ErrorCurve(fac)
                else:
                    unit_key = None if step_key is None else fingerprint(step_key, i)
                    self.select(i, fac, runner, unit_key)
            if mode == "sequential":
                self.fold(step, track=True)

    def correct(self, indices, tag) -> None:
        """Corrective selections of ``indices``, each folded before the next is calibrated."""
        for i in indices:
            step_key = None if self.key is None else fingerprint(self.state, tag, i,
                                                                  "corrective")
            upstream = self.reference if self.tracked else None  # nothing folded yet: Z_o = Z_c
            k = None if self.widths is None else self.widths[0][i]
            self.results[0][i] = self.nc._corrective_selection(
                self.work, upstream, self.units[i], k, step_key, self.cache, self.batches,
                before_pass=self.rewind)
            self.fold([i], track=True)

    def select(self, i, fac, runner, unit_key=None) -> None:
        """Unit ``i``'s selection for every target. A width the route does not resolve is
        recomputed on a finer one first (replaying the block's inputs through ``runner``), as
        a one-pass fit does; with candidates, at the widest (the most demanding)."""
        from ._compressor import _selection

        unit = self.units[i]
        (fac,) = self.nc._for_objective(self.work, [unit], [fac])
        if self.widths is None:
            widths = [self.nc._widths([fac], [unit], None)[0]]
        else:
            widths = [candidate[i] for candidate in self.widths]
        (fac,), (k,) = self.nc._recheck(self.work, [unit], [fac], [max(widths)], self.batches,
                                        unit_key, self.cache, before_pass=runner.tape.rewind)
        if self.widths is None:
            widths = [k]  # a tol width, chosen again from the finer errors
        for results, k in zip(self.results, widths, strict=True):
            results[i] = _selection(unit, fac, k)

    def fold(self, indices, track=False) -> None:
        """Apply the selections of ``indices`` to the targets and drop their T's.

        ``track``: later statistics depend on this fold (sequential), so it enters their keys.
        """
        from ._compressor import _apply, _plan_content

        for target, results in zip(self.targets, self.results, strict=True):
            for i in indices:
                selection = results[i]
                _apply(target, selection)
                self.tracked += track
                if track and self.key is not None:
                    self.state = fingerprint(self.state, _plan_content([selection]))
                # new (0, m) arrays: a slice would be a view keeping the whole T alive
                changes = {"interpolation": _emptied(selection.interpolation)}
                if getattr(selection, "interpolations", None) is not None:
                    changes["interpolations"] = tuple(map(_emptied, selection.interpolations))
                results[i] = dataclasses.replace(selection, **changes)
