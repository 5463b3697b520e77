"""Find the prunable units of a torch model by following one forward pass.

Offers :func:`find_units`, which records the executed dataflow graph of one forward pass on
a small example batch (:mod:`skid.nn._trace`) and follows the output channels of every
``Linear``/``Conv`` layer: it returns the :class:`~skid.nn._plan.ChannelGroup` records
(producers → per-channel ops and gates → every consumer) in forward order, and a
:class:`~skid.nn._plan.Skipped` record with the reason for every other candidate. An op skid
does not know is never assumed to preserve channels; it blocks the whole group and says so.
"""

from __future__ import annotations

from torch import nn

from .._validation import nearest_names
from ..exceptions import InvalidParameterError
from ._channel_walk import Blocked, GroupWalk, is_candidate
from ._plan import ChannelGroup, Skipped
from ._trace import Graph, record

__all__ = ["find_units"]

# ----------------------------------------------------------------------------------------
# Public entry point.

def find_units(model: nn.Module, example_args, example_kwargs=None, *, layers="auto",
               exclude=(), residual=False) -> tuple[list[ChannelGroup], list[Skipped]]:
    """Find the prunable channel groups of ``model`` by following one forward pass.

    A group starts at a producer (``nn.Linear`` or ``nn.Conv{1,2,3}d`` with ``groups=1``).
    Its channels may pass through per-channel operations (BatchNorm/InstanceNorm,
    elementwise activations, dropout, pooling and reductions over other axes, reshapes and
    transposes that keep the channel axis, PReLU and depthwise convolutions) and elementwise
    products with another producer's channels (a gated MLP, a squeeze-excitation gate), which
    joins that producer to the group. Every use of every such tensor must be one of these or a
    consuming ``Linear``/``Conv`` (``groups=1``, possibly after a channel-major flatten into a
    ``Linear``); any other use (a residual add, a concatenation, a channel-mixing op, the
    model output) blocks the whole group.

    Parameters
    ----------
    model : torch.nn.Module
        The model; it is run once in eval mode under ``no_grad`` and its training flags are
        restored afterwards. Its parameters are not modified.
    example_args : torch.Tensor or tuple or list
        Positional inputs of one small batch (a couple of samples is enough); a tensor is
        the single positional input, a tuple or list holds all of them.
    example_kwargs : dict, default=None
        Keyword inputs of the same batch (e.g. ``input_ids``, ``attention_mask``).
    layers : "auto" or list of str or (str, str), default="auto"
        Restrict the result to these producers, or ``(producer, consumer)`` pairs.
    exclude : iterable of str, default=()
        Modules never to prune: a unit is dropped if its producer, its consumer or one of
        its passthroughs is named here or lies inside a named module.
    residual : bool, default=False
        Let an ``add``/``sub`` join producers as a product does: the channels of a CNN stage's
        residual stream (every writer added into it, every dense reader of it) become one
        group of kind ``"residual_stage"``. Groups that meet no such add are found as without it.

    Returns
    -------
    units : list of ChannelGroup
        Prunable groups in forward order (of their first producer).
    skipped : list of Skipped
        Every other ``Linear``/``Conv`` producer candidate, with the reason.

    Raises
    ------
    ValueError
        If a name in ``layers``/``exclude`` is not a module of ``model`` (with a did-you-mean
        hint), if a producer in ``layers`` is not a ``Linear``/``Conv`` module, or if the
        forward pass fails on the example input.
    """
    modules = dict(model.named_modules())
    wanted = _check_layers(layers, modules)
    excluded = _check_names(exclude, modules, "exclude")
    args = example_args if isinstance(example_args, (tuple, list)) else (example_args,)
    graph = record(model, tuple(args), dict(example_kwargs or {}))
    units, skipped = _restrict(*_all_units(graph, model, residual), wanted, excluded)
    first_call = {}
    for index, node in enumerate(graph.nodes):
        first_call.setdefault(node.module, index)
    skipped.sort(key=lambda s: first_call.get(s.producer, len(graph.nodes)))  # forward order
    return units, skipped


def _all_units(graph: Graph, model: nn.Module, residual: bool = False):
    """Groups and skip records for every Linear/Conv producer candidate, in forward order."""
    units, skipped, seen = [], [], set()
    shared = _shared_parameter_owners(model)
    used_directly = _parameters_used_by_ops(graph)
    for index, node in enumerate(graph.nodes):
        if node.kind not in ("linear", "conv") or node.module in seen:
            continue
        if not is_candidate(graph.modules[node.module]):
            seen.add(node.module)
            continue
        walk = None
        try:
            walk = GroupWalk(graph, index, residual)
            unit = walk.run()
            _check_single_use(graph, unit, shared, used_directly)
            units.append(unit)
            seen.update(unit.producers)
        except Blocked as reason:
            skipped += _skip_all(walk, node.module, str(reason), seen)
        except Exception as error:  # unknown means blocked, even for an op skid misreads
            reason = f"skid could not follow its channels ({error})"
            skipped += _skip_all(walk, node.module, reason, seen)
    for name, module in graph.modules.items():
        if is_candidate(module) and name not in seen:
            skipped.append(Skipped(name, "it is not called in the forward pass"))
    return units, skipped


def _skip_all(walk, seed: str, reason: str, seen: set) -> list[Skipped]:
    """A blocked group: every producer found so far is skipped with the same reason."""
    names = [seed] + [p for p in (walk.producers if walk else ()) if p != seed]
    names = [n for n in names if n not in seen]
    seen.update(names)
    return [Skipped(name, reason) for name in names]


def _check_single_use(graph: Graph, unit: ChannelGroup, shared: dict, used_directly: set) -> None:
    """Every module of the group runs once and owns its weights alone."""
    for name in unit.modules():
        role = "it" if name == unit.producer else repr(name)
        calls = graph.calls.get(name, 0)
        if calls != 1:
            raise Blocked(f"{role} is called {calls} times (shared weights)")
        if name in shared:
            raise Blocked(f"{role} shares parameters with {shared[name]!r}")
        if name in used_directly:
            raise Blocked(f"{role} has parameters that other operations use directly")


def _shared_parameter_owners(model: nn.Module) -> dict[str, str]:
    """Module name -> another module holding one of its parameters (tied weights)."""
    owners: dict[int, tuple[str, nn.Module]] = {}
    shared = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for param in module.parameters(recurse=False):
            other, owner = owners.setdefault(id(param), (name, module))
            if owner is not module:  # one module under two names is not sharing
                shared[name] = other
                shared.setdefault(other, name)
    return shared


def _parameters_used_by_ops(graph: Graph) -> set[str]:
    """Names of modules whose parameters feed a recorded op (e.g. ``F.linear(x, m.weight)``)."""
    used = {id(t) for value_id, t in graph.source_tensors() if graph.values[value_id].users}
    return {name for name, module in graph.modules.items()
            if any(id(p) in used for p in module.parameters(recurse=False))}


def _check_names(names, modules: dict, what: str) -> set[str]:
    """Validate module names; InvalidParameterError with a did-you-mean hint for unknown ones."""
    if names is None:
        return set()
    if isinstance(names, str):
        names = [names]
    checked = set()
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"{what} must hold module names (str); got {name!r}")
        if name not in modules:
            raise InvalidParameterError(
                f"{what}: the model has no module {name!r}"
                f"{nearest_names(name, [n for n in modules if n])}"
            )
        checked.add(name)
    return checked


def _check_layers(layers, modules: dict):
    """None for "auto", else (producer names, (producer, consumer) pairs)."""
    if layers is None or (isinstance(layers, str) and layers == "auto"):
        return None
    if isinstance(layers, str):
        layers = [layers]
    producers, pairs = set(), set()
    for entry in layers:
        if isinstance(entry, (tuple, list)) and len(entry) == 2:
            _check_names(list(entry), modules, "layers")
            pairs.add(tuple(entry))
        elif isinstance(entry, str):
            producers |= _check_names([entry], modules, "layers")
        else:
            raise TypeError("layers must be 'auto' or a list of module names or "
                            f"(producer, consumer) pairs; got {entry!r}")
    for name in producers | {p for p, _ in pairs}:
        if not is_candidate(modules[name]):
            raise ValueError(f"layers: {name!r} is a {type(modules[name]).__name__}, not a "
                             "Linear or Conv (groups=1) module that can produce channels")
    return producers, pairs


def _restrict(units, skipped, wanted, excluded):
    """Apply ``layers`` and ``exclude`` to the groups found."""
    kept = []
    for unit in units:
        reason = _exclusion(unit, excluded) or _not_wanted(unit, wanted)
        if reason:
            skipped.extend(Skipped(producer, reason) for producer in unit.producers)
        else:
            kept.append(unit)
    return kept, skipped


def _exclusion(unit: ChannelGroup, excluded: set) -> str | None:
    """Why the group is excluded (one of its modules is in, or inside, ``exclude``), or None."""
    for name in unit.modules():
        if name in excluded:
            return f"excluded: {name!r} is in `exclude`"
        inside = [e for e in excluded if e == "" or name.startswith(e + ".")]
        if inside:
            return f"excluded: {name!r} is inside {inside[0]!r}, which is in `exclude`"
    return None


def _not_wanted(unit: ChannelGroup, wanted) -> str | None:
    if wanted is None:
        return None
    producers, pairs = wanted
    consumers = {c.name for c in unit.consumers}
    if set(unit.producers) & producers or any(
            p in unit.producers and c in consumers for p, c in pairs):
        return None
    if any(p in unit.producers for p, _ in pairs):
        return f"its channels feed {unit.consumer!r}, not the consumer named in `layers`"
    return "not listed in `layers`"
