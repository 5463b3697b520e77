"""Finding the attention blocks whose heads a fit can prune, on the working copy.

:class:`HeadProbes` finds the blocks whose layout and widths allow it (:mod:`skid.nn._heads`),
then, during a forward pass on the example, runs each as a copy with one head, or key/value
group, fewer, and records every module's first call: the channel trace's pass serves
(:func:`skid.nn._discovery.find_all_units`), or one of its own (:func:`find_heads`).
:func:`in_forward_order` sorts units by those first calls; :func:`release_heads` gives blocks
that will not be pruned their own class back.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from torch import nn

from ._attention_layouts import FORMS, AttentionLayout, attention_layout
from ._heads import (
    HeadSelection,
    HeadUnit,
    apply_head_selection,
    head_rows,
    int_attribute,
    per_head_target,
    restore_form,
)
from ._hooks import HookSet
from ._plan import Skipped
from ._surgery import sharing_copy, surgery_for
from ._trace import paused_trace

__all__ = ["HeadProbes", "find_heads", "in_forward_order", "needs_forms", "release_heads"]


def find_heads(model: nn.Module, example_args, example_kwargs=None, *, exclude=(),
               call_order=None):
    """Self-attention blocks whose heads can be pruned, and the attention blocks left alone.

    A block counts only if the forward pass on the example calls its output projection, and
    only if its forward runs with one head (or key/value group) fewer: a block whose code fixes
    its width another way (a reshape to the input width) is skipped with the error it raised.
    Both are seen in one forward pass (:class:`HeadProbes`, which can ride on another
    finder's pass instead). ``model`` must be the compressor's working copy: a block with a
    ``form`` (an ``nn.MultiheadAttention``) takes that class in place, with all its heads.

    Parameters
    ----------
    call_order : dict, optional
        Filled with the position of every module's first call in that pass (by qualified
        name), what :func:`in_forward_order` needs, so it needs no pass of its own.

    Returns
    -------
    units : list of HeadUnit, in forward order
    skipped : list of Skipped
    """
    probes = HeadProbes(model, exclude=exclude, call_order=call_order)
    if probes.found or call_order is not None:
        with probes:
            _run_once(model, example_args, example_kwargs or {})
    return probes.result()


def needs_forms(model: nn.Module) -> bool:
    """Whether an attention block of ``model`` would take a pruning form (an
    ``nn.MultiheadAttention``): :class:`HeadProbes` gives it that class when it is made."""
    return any(isinstance(layout := attention_layout(m), AttentionLayout) and layout.form
               for m in model.modules())


class HeadProbes(HookSet):
    """The attention blocks that can lose heads, seen during one forward pass on the example.

    Made, it holds the blocks whose layout and widths allow pruning heads (``found``, giving
    a block with a ``form`` that class in place) and the skip records so far. Entered, its
    hooks record the position of every module's first call (by each of its names) and run each
    found block, on its first call, as a copy (sharing the tensors, which the surgery replaces)
    with one head, or key/value group, fewer: a block fails if that raises or gives an output
    of another shape. Any forward pass of the model inside serves, the channel trace's too
    (the probes are not traced). :meth:`result` then gives the units and skip records.

    Parameters
    ----------
    model : nn.Module
        The compressor's working copy.
    exclude : iterable of str
        Blocks (and the modules under them) not to prune.
    call_order : dict, optional
        Filled with the first calls' positions (a new dict if None).
    """

    def __init__(self, model: nn.Module, *, exclude=(), call_order=None):
        super().__init__()
        self.model = model
        self.order = {} if call_order is None else call_order
        self.failures = {}
        self.found, self.skipped = [], []
        for name, module in model.named_modules():
            layout = attention_layout(module)
            if layout is None:
                continue
            if isinstance(layout, str):
                self.skipped.append(Skipped(name, f"attention heads: {layout}"))
                continue
            if any(name == e or name.startswith(e + ".") for e in exclude if e):
                self.skipped.append(Skipped(name, "attention heads: excluded"))
                continue
            if layout.form:
                FORMS[layout.form][0](module)
            unit, reason = _head_unit(model, name, layout)
            if unit is None:
                restore_form(module, layout)
                self.skipped.append(Skipped(name, f"attention heads: {reason}"))
            else:
                self.found.append(unit)

    def register(self) -> None:
        order, tried = self.order, set()
        for name, module in self.model.named_modules(remove_duplicate=False):
            def called(block, inputs, name=name, module=module):
                if block is module:  # not a probe's copy, which copies this hook
                    order.setdefault(name, len(order))
            self.keep(module.register_forward_pre_hook(called))
        for unit in self.found:
            def probe(block, inputs, kw, output, unit=unit):
                if unit.attention in tried:
                    return  # later calls, and the copy's own call (it copies this hook)
                tried.add(unit.attention)
                with paused_trace():  # the copy's ops are not the model's
                    reason = _try_fewer_heads(block, unit, inputs, kw, output)
                if reason:
                    self.failures[unit.attention] = reason
            block = self.model.get_submodule(unit.attention)
            self.keep(block.register_forward_hook(probe, with_kwargs=True))

    def result(self) -> tuple[list, list]:
        """``(units, skipped)``: the found blocks called and probed successfully, in forward
        order; the others give their ``form`` back and are skipped with the reason."""
        if self.found and "" not in self.order:  # the model's own call is recorded first
            raise RuntimeError("Internal error: no forward pass of the model ran while the "
                               "attention blocks' probes were in place.")
        units, skipped = [], list(self.skipped)
        for unit in self.found:
            reason = ("never called on the data" if unit.consumer not in self.order
                      else self.failures.get(unit.attention))
            if reason is None:
                units.append(unit)
            else:
                restore_form(self.model.get_submodule(unit.attention), unit.layout)
                skipped.append(Skipped(unit.attention, f"attention heads: {reason}"))
        units.sort(key=lambda u: self.order[u.consumer])
        return units, skipped


def release_heads(model: nn.Module, units) -> None:
    """Give the blocks of ``units`` that will not be pruned back their own class (the form
    :func:`find_heads` gave them, e.g. ``PrunedMultiheadAttention``, is for pruning)."""
    for unit in units:
        restore_form(model.get_submodule(unit.attention), unit.layout)


def _head_unit(model, name, layout):
    """The unit of one block with ``layout``, or ``(None, reason)``."""
    unit = HeadUnit(name, layout, 1, 1)
    q = model.get_submodule(unit.name(layout.queries))
    k = model.get_submodule(unit.name(layout.keys))
    o = model.get_submodule(unit.consumer)
    d = layout.head_dim
    q_width = _out_width(q) // 3 if layout.fused else _out_width(q)
    kv_width = q_width if layout.fused else _out_width(k)
    if q_width % d or kv_width % d or _in_width(o) != q_width:
        return None, (f"projection widths ({q_width} queries, {kv_width} keys, output input "
                      f"{_in_width(o)}) are not whole heads of {d}")
    n_heads, n_kv = q_width // d, kv_width // d
    if n_heads % n_kv:
        return None, f"{n_heads} query heads do not split evenly over {n_kv} key/value heads"
    holder = model.get_submodule(unit.name(layout.holder))
    groups = int_attribute(holder, "num_key_value_groups")
    if groups is not None and groups != n_heads // n_kv:
        return None, f"num_key_value_groups={groups} does not match {n_heads}/{n_kv} heads"
    if n_heads < 2:
        return None, "a single head"
    block = model.get_submodule(name)
    for spec in layout.per_head:
        size, expected = _per_head_size(block, spec), n_heads * (d if spec.rows else 1)
        if size != expected:
            return None, f"{spec.name} has {size} entries where {expected} follow the heads"
    return HeadUnit(name, layout, n_heads, n_kv), None


def _per_head_size(block, spec) -> int:
    found = per_head_target(block, spec)
    if isinstance(found, nn.Module):
        return _out_width(found)
    return int(found.shape[spec.axis]) if found.dim() > spec.axis else -1


#: Keyword arguments of a block's forward that carry a cache a probe must not update.
_CACHES = ("past_key_values", "past_key_value", "layer_past", "cache")


def _try_fewer_heads(block, unit, args, kwargs, output):
    H, n_kv, size, d = unit.n_heads, unit.n_kv_heads, unit.group_size, unit.head_dim
    local = replace(unit, attention="")
    if size == 1 or n_kv == 1:
        heads = np.arange(H - 1)
        kv_heads = heads if size == 1 else np.arange(n_kv)
    else:
        heads, kv_heads = np.arange(H - size), np.arange(n_kv - 1)
    columns = head_rows(heads, d)
    T = np.zeros((columns.size, H * d))
    T[np.arange(columns.size), columns] = 1.0
    kwargs = {k: (None if k in _CACHES else False if k == "use_cache" else v)
              for k, v in kwargs.items()}
    try:
        small = apply_head_selection(sharing_copy(block),
                                     HeadSelection(local, heads, kv_heads, T, 0.0))
        out = small(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - any failure means the block cannot lose heads
        message = " ".join(str(exc).split())[:160]
        return f"its forward does not run with fewer heads ({type(exc).__name__}: {message})"
    before, after = _first_tensor(output), _first_tensor(out)
    if before is not None and (after is None or after.shape != before.shape):
        return "its output changes shape with fewer heads"
    return None


def _first_tensor(output):
    while isinstance(output, (tuple, list)) and output:
        output = output[0]
    return output if isinstance(output, torch.Tensor) else None


def _out_width(module) -> int:
    """Output channels, as the layer kind's registry entry reads them (Linear, HF Conv1D)."""
    return int(surgery_for(module).out_width(module))


def _in_width(module) -> int:
    return int(surgery_for(module).in_width(module))


def in_forward_order(model, units, args, kwargs, order=None) -> list:
    """Channel groups and head units together, by the first call of their first producer
    (a stable sort: units with one producer keep their order). ``order`` is a
    ``call_order`` that :func:`find_heads` filled on this model; without it, a forward pass
    on the example finds it."""
    if order is None:
        order = _call_order(model, list(dict.fromkeys(u.producer for u in units)), args,
                            kwargs)
    return sorted(units, key=lambda u: order.get(u.producer, len(order)))


def _run_once(model, args, kwargs) -> None:
    """One forward pass without gradients."""
    with torch.no_grad():
        model(*args, **kwargs)


def _call_order(model, names, args, kwargs) -> dict:
    """Position of each named module's first call in one forward pass."""
    order, handles = {}, []
    for name in names:
        def hook(module, inputs, name=name):
            order.setdefault(name, len(order))
        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    try:
        _run_once(model, args, kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return order
