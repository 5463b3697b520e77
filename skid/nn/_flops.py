"""FLOPs and parameter counts of a torch model.

Offers :func:`count_flops` (FLOPs per sample, 2 per multiply-add, counted with the formulas of
:mod:`torch.utils.flop_counter` on a one-sample forward pass, in total and per
``Linear``/``Conv`` module) and :func:`count_params`.

The count is :class:`~torch.utils.flop_counter.FlopCounterMode`'s, op for op (the same
formulas, the same decompositions of ops it has none for), without its module tracker (hooks
on every module call, and a per-module table this module does not read): half the time of a
one-sample pass on the benchmark's LLaMA. A model that runs a higher-order operator
(``torch.cond``) is counted by ``FlopCounterMode`` itself, which has their rules.

Every attention is counted, its projections and its scores (``QKᵀ`` and the product with
``V``), from the shapes that really run: ``torch``'s fused fast path of
``nn.MultiheadAttention``/``nn.TransformerEncoderLayer`` (which the counter does not see) is
switched off for the count, and the CPU kernel of ``scaled_dot_product_attention`` (what
Hugging Face models run by default) gets the formula the counter has for the GPU kernels.

A ``Linear``/``Conv`` module's FLOPs are proportional to ``in_channels × out_channels``
(depthwise convolutions: to the channels), so after pruning a module keeps the fraction
``(k_in / m_in) × (k_out / m_out)`` of its FLOPs at full width.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import (
    FlopCounterMode,
    flop_registry,
    sdpa_flop_count,
    shape_wrapper,
)

from ._trace import module_kind

__all__ = ["count_flops", "count_params"]


def _sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of ``scaled_dot_product_attention`` from its operands' shapes (grouped-query
    attention included): ``2·b·h·L·S·(d_k + d_v)``, the same as the GPU kernels' formula."""
    return sdpa_flop_count(query, key, value)


#: Attention kernels the counter has no formula for (the counter passes shapes: see
#: ``torch.utils.flop_counter.shape_wrapper``).
_EXTRA_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops}

#: Ops that only ask about a tensor's layout: FlopCounterMode passes them on (returns
#: NotImplemented) for tensor subclasses with their own size and stride rules.
_LAYOUT_QUERIES = frozenset(getattr(torch.ops.aten, name).default for name in (
    "sym_is_contiguous", "is_contiguous", "is_strides_like_format",
    "is_non_overlapping_and_dense", "size", "sym_size", "stride", "sym_stride",
    "storage_offset", "sym_storage_offset", "numel", "sym_numel", "dim",
)) | {torch.ops.aten.is_contiguous.memory_format, torch.ops.prim.layout.default}


class _HigherOrderOperator(Exception):
    """The model ran an operator (``torch.cond``) that only ``FlopCounterMode`` counts."""


class _FlopCount(TorchDispatchMode):
    """FLOPs of every op run within it, in ``total``: FlopCounterMode's rule op by op (an op
    with no formula is decomposed where it can be, and its parts counted), without a module
    tracker."""

    supports_higher_order_operators = True  # to hand them to FlopCounterMode (see above)
    registry = {**flop_registry, **{k: shape_wrapper(v) for k, v in _EXTRA_FORMULAS.items()}}

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _LAYOUT_QUERIES:
            return NotImplemented
        if isinstance(func, torch._ops.HigherOrderOperator):
            raise _HigherOrderOperator
        if func not in self.registry and func is not torch.ops.prim.device.default:
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        out = func(*args, **kwargs)
        formula = self.registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def count_flops(model: nn.Module, example_args, example_kwargs=None, *,
                own=()) -> tuple[int, dict]:
    """FLOPs of one sample's forward pass, in total and per ``Linear``/``Conv`` module.

    Parameters
    ----------
    model : torch.nn.Module
        Run once in eval mode under ``no_grad``; its training flags are restored.
    example_args : torch.Tensor or tuple
        Positional inputs of a batch; every tensor is cut to its first sample (``[:1]``).
    example_kwargs : dict, default=None
        Keyword inputs of the same batch, cut the same way.
    own : iterable of str, default=()
        Other modules (e.g. attention blocks) whose own FLOPs to report too: what their calls
        count beyond the ``Linear``/``Conv`` modules inside them (the attention scores).

    Returns
    -------
    total : int
        FLOPs per sample (2 per multiply-add) of every op ``FlopCounterMode`` counts
        (matrix products, convolutions, attention).
    per_module : dict of str to int
        Qualified name → FLOPs per sample of each ``Linear``/``Conv`` module that ran (summed
        over its calls), and of each module of ``own`` (its own FLOPs only).
    """
    args = example_args if isinstance(example_args, (tuple, list)) else (example_args,)
    args, kwargs = _first_sample(tuple(args)), _first_sample(dict(example_kwargs or {}))
    own = set(own)
    try:
        total, per_module = _counted_pass(model, args, kwargs, own, _FlopCount())
    except _HigherOrderOperator:
        total, per_module = _counted_pass(model, args, kwargs, own, _TorchCount())
    for block in own & set(per_module):
        inside = [n for n in per_module if n.startswith(f"{block}.") and n not in own]
        per_module[block] -= sum(per_module[n] for n in inside)
    return int(total), per_module


class _TorchCount(FlopCounterMode):
    """``FlopCounterMode`` with :class:`_FlopCount`'s ``total``."""

    def __init__(self):
        super().__init__(display=False, custom_mapping=_EXTRA_FORMULAS)

    @property
    def total(self) -> int:
        return self.get_total_flops()


def _counted_pass(model, args, kwargs, own, counter) -> tuple[int, dict]:
    """One forward pass under ``counter``: its total, and each ``Linear``/``Conv`` module's
    (and each of ``own``'s) FLOPs, summed over its calls, inner modules included."""
    per_module: dict[str, int] = {}
    handles, modes = [], {m: m.training for m in model.modules()}
    for name, module in model.named_modules():
        if module_kind(module) in ("linear", "conv") or name in own:
            handles += _attribution_hooks(module, name, counter, per_module)
    try:
        model.eval()
        with torch.no_grad(), _no_fused_attention(), counter:
            model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    return counter.total, per_module


@contextlib.contextmanager
def _no_fused_attention():
    """``nn.MultiheadAttention``'s op-by-op path for the duration: its fused fast path (eval,
    no_grad) is one kernel the counter does not count. The results are the same."""
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


def _attribution_hooks(module: nn.Module, name: str, counter, per_module: dict) -> list:
    """Hooks that add the FLOPs ``counter`` counted during each call of ``module`` to
    ``per_module``."""
    start = []

    def before(module, args):
        start.append(counter.total)

    def after(module, args, output):
        per_module[name] = per_module.get(name, 0) + counter.total - start.pop()

    return [module.register_forward_pre_hook(before), module.register_forward_hook(after)]


def _first_sample(obj):
    """Every tensor with a batch axis in nested tuples/lists/dicts, cut to ``[:1]``."""
    if isinstance(obj, torch.Tensor):
        return obj[:1] if obj.ndim else obj
    if isinstance(obj, Mapping):
        return {key: _first_sample(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_first_sample(value) for value in obj)
    return obj


def count_params(model: nn.Module) -> int:
    """Number of parameters of ``model`` (a tensor shared by several modules counts once)."""
    return sum(p.numel() for p in model.parameters())
