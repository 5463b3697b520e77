"""What a model handed to :class:`~skid.nn.NetworkCompressor` must be, with errors that say why.

The compressor rewrites an eager ``nn.Module`` layer by layer on a deep copy. A function, a
TorchScript module (its code is compiled, not Python modules), a model on the ``meta``
device (shapes without values) or a model that still carries
``torch.nn.utils.prune`` masks (its weights are recomputed by hooks, and a deep copy refuses
them) cannot be handled; each gets a message that says what to pass instead.
"""

from __future__ import annotations

import inspect
import itertools

import torch
from torch import nn
from torch.nn.utils import prune

__all__ = ["check_model"]


def check_model(model) -> nn.Module:
    """Return ``model`` if the compressor can work on it; raise a clear error otherwise.

    Raises
    ------
    TypeError
        If ``model`` is not an ``nn.Module`` (a function, say) or is a TorchScript module.
    ValueError
        If ``model`` is on the meta device or has ``torch.nn.utils.prune`` masks attached.
    """
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError(
            f"TorchScript is not supported (got a {type(model).__name__}): its code cannot be "
            "rewritten layer by layer. Pass the eager nn.Module that was scripted instead."
        )
    if not isinstance(model, nn.Module):
        what = (f"the function {getattr(model, '__qualname__', model)!r}"
                if inspect.isroutine(model) else f"an object of type {type(model).__name__}")
        raise TypeError(
            f"model must be a torch.nn.Module; got {what}. skid prunes the Linear/Conv "
            "modules of an nn.Module: put the layers in an nn.Module (e.g. nn.Sequential) and "
            "pass that."
        )
    meta = next((n for n, t in itertools.chain(model.named_parameters(), model.named_buffers())
                 if t.is_meta), None)
    if meta is not None:
        raise ValueError(
            f"The model is on the meta device ({meta!r} has a shape but no values: built under "
            "torch.device('meta'), or loaded without its weights), so it cannot run on "
            "calibration data. Load its weights first (e.g. from_pretrained without "
            "device_map='meta', or model.to_empty(device='cpu') then load_state_dict)."
        )
    masked = _pruning_masks(model)
    if masked:
        raise ValueError(
            f"The model carries torch.nn.utils.prune masks ({', '.join(masked)}), which a copy "
            "of the model cannot hold. Call torch.nn.utils.prune.remove(module, name) on each "
            "first (on a copy, if you need to keep the masks): it makes the pruned weights "
            "plain parameters."
        )
    return model


def _pruning_masks(model: nn.Module) -> list[str]:
    """Qualified names of the tensors that torch.nn.utils.prune hooks recompute."""
    masked = []
    for name, module in model.named_modules():
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, prune.BasePruningMethod):
                tensor = hook._tensor_name
                masked.append(f"{name}.{tensor}" if name else tensor)
    return masked
