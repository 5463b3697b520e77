"""FLOPs and parameter counts of a torch model.

Offers :func:`count_flops` (FLOPs per sample, 2 per multiply-add, counted by
:class:`torch.utils.flop_counter.FlopCounterMode` on a one-sample forward pass, in total and
per ``Linear``/``Conv`` module) and :func:`count_params`.

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
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from ._trace import module_kind

__all__ = ["count_flops", "count_params"]


def _sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of ``scaled_dot_product_attention`` from its operands' shapes (grouped-query
    attention included): ``2·b·h·L·S·(d_k + d_v)``, the same as the GPU kernels' formula."""
    return sdpa_flop_count(query, key, value)


#: Attention kernels the counter has no formula for (the counter passes shapes: see
#: ``torch.utils.flop_counter.shape_wrapper``).
_EXTRA_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops}


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
    per_module: dict[str, int] = {}
    counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS)
    handles, modes = [], {m: m.training for m in model.modules()}
    own = set(own)
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
    for block in own & set(per_module):
        inside = [n for n in per_module if n.startswith(f"{block}.") and n not in own]
        per_module[block] -= sum(per_module[n] for n in inside)
    return int(counter.get_total_flops()), per_module


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


def _attribution_hooks(module: nn.Module, name: str, counter: FlopCounterMode,
                       per_module: dict) -> list:
    """Hooks that add the FLOPs counted during each call of ``module`` to ``per_module``."""
    start = []

    def before(module, args):
        start.append(counter.get_total_flops())

    def after(module, args, output):
        per_module[name] = per_module.get(name, 0) + counter.get_total_flops() - start.pop()

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
