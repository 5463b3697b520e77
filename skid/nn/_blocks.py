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

import torch
from torch import nn

from .._validation import suggest
from ._calibration import (
    _StopForward,
    run_model,
    running_to_the_end,
    to_inputs,
)
from ._outputs import first_tensor
from ._trace import map_tensors

__all__ = ["BlockLayout", "Runner", "TapeStore", "find_blocks"]


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
    return first_tensor(output)


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


# What the block-wise driver (:mod:`skid.nn._blockwise`) builds on.
Runner, TapeStore = _Runner, _TapeStore
