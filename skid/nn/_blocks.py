"""Block-wise calibration: one repeated block (a transformer layer) at a time.

A model's *blocks* are the members of an ``nn.ModuleList`` that run one after another, each on
the previous one's output (HF decoder/encoder layers). Calibrating block by block holds only
that block's statistics, and only that block needs to be on the calibration device:

* every member except the current one *replays*: it stays in place (the model's forward may
  read its attributes, hooks on it still run) but its forward is replaced by a
  :class:`_Replay` that hands back the previous block's outputs, cached for every calibration
  batch (the *tape*, :mod:`skid.nn._tapes`: on the host, or with ``memory=`` as files under
  its folder), so a pass costs the code around the blocks (embeddings, masks) plus one block;
* the block's units get their statistics from those inputs (``unit_statistics`` with the
  model's own code computing every extra argument: masks, rotary embeddings); the same pass
  records the block's outputs as the next tape (``"original"``), or a pass after its units
  are folded records those of the compressed block (``"sequential"``);
* units outside the blocks are calibrated before them (those whose consumer runs before the
  first block) or after them, with every member replayed.

This reproduces one pass only if the model reads each block's output through the next block
alone; :func:`find_blocks` tries the replays on the example first and otherwise calibrates in
one pass (with a warning that says why). With ``calibration="original"`` the statistics are
those of one pass over the whole model, so the result is the same. Statistics and tapes go
through ``memory=``, keyed per block, so an interrupted run resumes without recomputing them
or running the finished blocks again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import warnings
from collections.abc import Mapping

import torch
from torch import nn

from .._validation import suggest
from ._batches import StopForward, run_model, to_inputs
from ._calibration import running_to_the_end
from ._hooks import HookSet
from ._outputs import first_tensor
from ._tapes import Recorder, Tape, TapeStore, flatten
from ._trace import map_tensors

__all__ = ["BlockLayout", "ExamplePass", "Runner", "find_blocks"]


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
    types : tuple of dict
        Per block, the classes of its output on the example, by qualified name.
    """

    name: str
    size: int
    before: tuple[int, ...]
    after: tuple[int, ...]
    inside: tuple[tuple[int, ...], ...]
    # per block, the classes its output is made of (a stored tape is rebuilt with these)
    types: tuple[dict, ...] = dataclasses.field(default=(), compare=False, repr=False)


# --------------------------------------------------------------------------------- detection


def find_blocks(model: nn.Module, example, spec, units, calls=None) -> BlockLayout | None:
    """The block layout of ``model`` for ``blocks=spec``; None when blocks are not used.

    ``spec`` is None (off), ``"auto"`` (the longest ``ModuleList`` that runs in sequence and
    that no unit straddles; None if there is none) or a qualified name (an error if that list
    does not qualify).

    Block-wise calibration must give the one-pass result, so the chosen list is tried on
    ``example`` as the calibration will run it (:func:`_replay_check`): if replaying finished
    blocks changes what a later block or unit sees (the model reads a block's output other than
    through the next block: a head over several blocks' states, a hook that edits outputs), or
    the model cannot run that way, ``"auto"`` warns with the reason and returns None (one pass)
    and a named list raises it.

    ``calls``: what an :class:`ExamplePass` recorded of a pass on ``example`` (None: a pass of
    its own records it).
    """
    if spec is None:
        return None
    modules = dict(model.named_modules())
    if spec != "auto" and not isinstance(modules.get(spec), nn.ModuleList):
        what = "is not an nn.ModuleList" if spec in modules else "does not exist"
        hint = "" if spec in modules else suggest(spec, modules)
        raise ValueError(f"blocks={spec!r}: that module {what}{hint}.")
    candidates = _candidates(modules, spec)
    if not candidates:
        return None
    if calls is None:
        calls = _record_calls(model, example, spec)
    layouts, reasons = [], {}
    for name in candidates:
        layout, reason = _layout(name, modules[name], calls, units)
        if layout is None:
            reasons[name] = reason
        else:
            layouts.append(layout)
    # the longest chain, if replaying its finished blocks changes nothing any unit sees
    for layout in sorted(layouts, key=lambda lay: -lay.size):
        reason = _replay_check(model, example, layout, calls, units)
        if reason is None:
            return layout
        reasons[layout.name] = reason
        if spec == "auto":
            from ._planner import caller_outside_skid

            warnings.warn(
                f"blocks='auto': {layout.name!r} is not calibrated block by block, since "
                f"{reason} Calibrating in one pass over the whole model instead (the same "
                "result, with every unit's statistics in memory at once); pass blocks=None "
                "to choose this without the warning.",
                UserWarning, stacklevel=caller_outside_skid(),
            )
            return None
    if spec != "auto":
        raise ValueError(f"blocks={spec!r} cannot be calibrated block by block: {reasons[spec]}")
    return None


def _candidates(modules: dict, spec) -> list:
    """Names of the ``nn.ModuleList`` s that ``spec`` lets :func:`find_blocks` try."""
    if spec == "auto":
        return [n for n, m in modules.items() if isinstance(m, nn.ModuleList) and len(m) > 1]
    return [spec] if isinstance(modules.get(spec), nn.ModuleList) else []


def _record_calls(model, example, spec):
    """One forward pass on ``example`` recording what :func:`_layout` reads (see
    :class:`ExamplePass`)."""
    with ExamplePass(model, spec) as recorded:
        with torch.no_grad():
            run_model(model, *example, what="first samples of the calibration data")
    return recorded.calls()


class ExamplePass(HookSet):
    """Records, during a forward pass of ``model`` on the example, what :func:`_layout` reads:
    the call index of every module's first call (by qualified name) and, per member of the
    ``lists`` (by identity), its ``(index, first input, output)`` calls, indices from one
    counter. Used around the unit finders, whose passes run the model anyway, it spares the
    block layout a pass of its own.

    Each call of the whole model starts a new record; the last that completed is kept.
    :meth:`calls` gives it only while every module still has the class it had then (the
    finders give a pruned attention form back its own class, whose code may differ). Calls of
    copies of the modules (a probe's, which copy their hooks) are not counted.

    Parameters
    ----------
    model : nn.Module
    spec : str or None
        ``blocks=`` as the estimator takes it: the members are those of the lists
        :func:`find_blocks` would try (None: nothing to record).
    """

    def __init__(self, model: nn.Module, spec):
        super().__init__()
        self.model = model
        modules = dict(model.named_modules())
        self.lists = [] if spec is None else [modules[n] for n in _candidates(modules, spec)]
        self._current = None  # (order, members, counter) of the pass under way
        self._complete = None  # (order, members, module classes) of the last finished pass

    def register(self) -> None:
        if not self.lists:
            return
        model = self.model

        def start(module, args):
            if module is model:
                self._current = ({}, {}, itertools.count())

        def finish(module, args, output):
            if module is model and self._current is not None:
                order, members, _ = self._current
                self._complete = (order, members, _classes(model))
                self._current = None

        def on_call(name, owner):
            def hook(module, args):
                if module is owner and self._current is not None:
                    order, _, counter = self._current
                    order.setdefault(name, next(counter))
            return hook

        def on_member(owner):
            def hook(module, args, kwargs, output):
                if module is owner and self._current is not None:
                    _, members, counter = self._current
                    members.setdefault(id(module), []).append(
                        (next(counter), _first_input(args, kwargs), output))
            return hook

        self.keep(model.register_forward_pre_hook(start))
        for name, module in model.named_modules():
            self.keep(module.register_forward_pre_hook(on_call(name, module)))
        for member in (m for module_list in self.lists for m in module_list):
            self.keep(member.register_forward_hook(on_member(member), with_kwargs=True))
        self.keep(model.register_forward_hook(finish))

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        self._current = None

    def calls(self):
        """``(order, members)`` of the last complete pass, or None (no pass, or a module's
        class changed since)."""
        if self._complete is None:
            return None
        order, members, classes = self._complete
        return (order, members) if classes == _classes(self.model) else None


def _classes(model: nn.Module) -> tuple:
    return tuple(type(m) for m in model.modules())


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
                         tuple(tuple(i) for i in inside), tuple(_types(r[0][2]) for r in records))
    return layout, None


def _replay_check(model, example, layout, calls, units):
    """None when the runner's replays reproduce, on ``example``, every block's output and the
    inputs of every module of the units after the blocks; else why not (a sentence).

    Each pass runs as a calibration pass does: the blocks before block ``b`` replay block
    ``b - 1``'s recorded output (the tape), block ``b`` runs; then every block replays the
    last one's output while the units after the blocks read their inputs.
    """
    _, members = calls
    module_list = model.get_submodule(layout.name)
    outputs = [members[id(m)][0][2] for m in module_list]
    after = sorted({n for i in layout.after for n in _unit_modules(units[i])})
    try:
        for b in range(1, layout.size):
            got = _replayed_pass(model, example, module_list, outputs[b - 1], b)
            if _differs(got, outputs[b],
                        lambda b=b: _replayed_pass(model, example, module_list, None, b)):
                return (f"block {b}'s output changes when the blocks before it are replayed: "
                        "the model reads their outputs other than through the next block "
                        "(e.g. a head or a later block over several blocks' states, or a hook "
                        "on a block that edits its output).")
        if after:
            reference = _replayed_pass(model, example, module_list, None, None, after)
            got = _replayed_pass(model, example, module_list, outputs[-1], None, after)
            control = None
            for name in after:
                if control is None and not _same_values(got.get(name), reference.get(name)):
                    control = _replayed_pass(model, example, module_list, None, None, after)
                if control is not None and _differs(got.get(name), reference.get(name),
                                                    lambda n=name, c=control: c.get(n)):
                    return (f"the input of {name!r} (after the blocks) changes when the blocks "
                            "are replayed: the model reads the outputs of blocks other than the "
                            "last (e.g. a head over several blocks' states).")
    except Exception as exc:  # noqa: BLE001 -- whatever stops it, one pass is the answer
        cause = exc.__cause__ if isinstance(exc, ValueError) and exc.__cause__ else exc
        return (f"the model does not run with its finished blocks replayed "
                f"({type(cause).__name__}: {cause}).")
    return None


def _replayed_pass(model, example, module_list, entry, stop, watch=()):
    """One pass on ``example`` with the members before ``stop`` (all when None) replaying
    ``entry`` (none when ``entry`` is None): member ``stop``'s output, or the first inputs of the
    modules named in ``watch`` (by name)."""
    members = list(module_list)
    replayed = [] if entry is None else members[: len(members) if stop is None else stop]
    seen, handles = {}, []

    def keep_output(module, args, output):
        seen["output"] = output
        raise StopForward

    def keep_input(name):
        def hook(module, args, kwargs):
            if name not in seen:
                seen[name] = map_tensors((args, kwargs), torch.clone)

        return hook

    modules = dict(model.named_modules())
    tape = Tape([entry])
    try:
        if stop is not None:
            handles.append(members[stop].register_forward_hook(keep_output))
        for name in watch:
            handles.append(modules[name].register_forward_pre_hook(keep_input(name),
                                                                   with_kwargs=True))
        with _replacing(replayed, tape, _example_device(example)), torch.no_grad():
            args, kwargs = example
            try:
                model(*args, **kwargs)
            except StopForward:
                pass
    finally:
        for handle in handles:
            handle.remove()
    return seen.get("output") if stop is not None else seen


def _example_device(example):
    """The device of the first tensor of ``example`` (CPU if it holds none)."""
    first = _first_input(*example)
    return torch.device("cpu") if first is None else first.device


def _differs(got, reference, control) -> bool:
    """Whether ``got`` (under replay) differs from ``reference`` by more than the model's own
    run-to-run variation: bit for bit when a second plain run (``control()``, called only when
    they differ) reproduces ``reference`` (always on the CPU), else by more than 4 times that
    run's deviation (nondeterministic GPU kernels)."""
    if _same_values(got, reference):
        return False
    again = control()
    if _same_values(again, reference) or len(_tensors(again)) != len(_tensors(reference)):
        return True
    noise = _deviation(again, reference)
    return not (_deviation(got, reference) <= 4 * noise)


def _deviation(a, b) -> float:
    """The largest absolute difference between two outputs' tensors (inf if they differ in
    layout)."""
    flat_a, flat_b = _tensors(a), _tensors(b)
    if len(flat_a) != len(flat_b) or any(
            x.shape != y.shape for x, y in zip(flat_a, flat_b, strict=True)):
        return float("inf")
    return max((float((x.double() - y.double()).abs().nan_to_num(0.0).max()) if x.numel()
                else 0.0 for x, y in zip(flat_a, flat_b, strict=True)), default=0.0)


def _same_values(a, b) -> bool:
    """Whether two outputs hold equal tensors (NaN where the other has NaN) in the same places."""
    flat_a, flat_b = _tensors(a), _tensors(b)
    return len(flat_a) == len(flat_b) and all(map(_same_tensor, flat_a, flat_b))


def _same_tensor(x, y) -> bool:
    if x.shape != y.shape or x.dtype != y.dtype or x.device != y.device:
        return False
    if not (x.is_floating_point() or x.is_complex()):
        return torch.equal(x, y)
    nan = torch.isnan(x)
    return torch.equal(nan, torch.isnan(y)) and torch.equal(x[~nan], y[~nan])


def _tensors(value) -> list:
    """The tensors in ``value`` (tuples, lists, dicts, NamedTuples, ModelOutputs), in order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return []


def _types(output) -> dict:
    """The classes of a block's output (none when a tape could not store it anyway)."""
    try:
        return flatten(output)[2]
    except TypeError:
        return {}


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


class _Replay:
    """A block member's forward while it replays: the tape's entry for the current batch.

    The member itself stays in place, only its ``forward`` is replaced (see
    :func:`_replacing`): a model that reads its blocks' attributes, or hooks on them, sees the
    real blocks. The first member's replay advances the tape (members run once per batch, in
    order).
    """

    def __init__(self, tape: Tape, advances: bool, device):
        self.tape, self.advances, self.device = tape, advances, device

    def __call__(self, *args, **kwargs):
        if self.advances:
            self.tape.position += 1
        return self.tape.current(self.device)


def _replay(member: nn.Module, replay) -> None:
    """Replace ``member``'s forward by ``replay`` (None: give it back its own).

    The forward is set on the instance, so ``nn.Module.__call__`` (and its hooks) run as usual.
    An instance-level forward that was there first (accelerate's device hooks set one) is kept
    aside and put back.
    """
    state = member.__dict__
    if replay is None:
        if "_skid_own_forward" in state:
            own = state.pop("_skid_own_forward")
            state.pop("forward", None)
            if own is not None:
                state["forward"] = own
        return
    state.setdefault("_skid_own_forward", state.get("forward"))
    state["forward"] = replay


@contextlib.contextmanager
def _replacing(members, tape: Tape, device):
    """``members`` replay ``tape`` for the duration, their own forwards back afterwards."""
    try:
        for i, member in enumerate(members):
            _replay(member, _Replay(tape, i == 0, device))
        yield
    finally:
        for member in members:
            _replay(member, None)


def _keeping_outputs(recorder: Recorder):
    """A forward hook that hands the member's output to ``recorder`` and ends the pass there."""

    def hook(module, args, output):
        recorder.append(output)
        raise StopForward

    return hook


def _move(module: nn.Module, device) -> None:
    """Move a block member (a seam tests use to watch which blocks are on the device)."""
    module.to(device)


def _move_trunk(model: nn.Module, module_list: nn.ModuleList, device) -> None:
    """Move ``model`` except the members of ``module_list`` (they stay where they are)."""
    members = dict(module_list._modules)
    module_list._modules.clear()
    try:
        model.to(device)
    finally:
        module_list._modules.update(members)


class Runner:
    """Keeps the trunk on ``device``; a member is moved in for its turn and replays otherwise
    (in place, with its forward replaced: see :class:`_Replay`)."""

    def __init__(self, model, layout: BlockLayout, device, home, store: TapeStore):
        self.model, self.device, self.home, self.store = model, device, home, store
        self.list = model.get_submodule(layout.name)
        self.members = list(self.list)
        self.types = layout.types or ({},) * len(self.members)
        self.tape = Tape()
        self._recorder = None
        self.active = True  # False once closed (tests watch it)
        for i, member in enumerate(self.members):
            _replay(member, _Replay(self.tape, i == 0, device))
        _move_trunk(model, self.list, device)

    def turn(self, i: int):
        """Move member ``i`` to the device and let it run; every member not turned replays."""
        _move(self.members[i], self.device)
        _replay(self.members[i], None)

    def end_turn(self, i: int) -> None:
        _replay(self.members[i], _Replay(self.tape, i == 0, self.device))
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
        recorder = Recorder(self.store.folder(key))
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
        stored = self.store.load(key, batches.n_batches, self.types[i])
        if stored is not None:
            self.tape.outputs = stored
            return
        recorder = Recorder(self.store.folder(key))
        handle = self.members[i].register_forward_hook(_keeping_outputs(recorder))
        self.tape.rewind()
        try:
            with torch.no_grad():
                for batch in batches:
                    args, kwargs = to_inputs(batch, self.device, dtype)
                    try:
                        run_model(self.model, args, kwargs)
                    except StopForward:
                        pass
        finally:
            handle.remove()
        outputs = recorder.finish(batches.n_batches)
        if outputs is None:
            raise RuntimeError(f"Internal error: block {i} did not run on every batch.")
        self.tape.outputs = outputs

    def close(self) -> None:
        for member in self.members:
            _replay(member, None)
        self.active = False
        self.model.to(self.home)
