"""Layer kinds: what a dense layer is to the walk, the FLOP count, calibration and surgery.

A kind is one entry of the surgery registry (:mod:`skid.nn._surgery`) with a ``walk`` role:
``"linear"`` (channels last: ``(..., in) → (..., out)``), ``"conv"``, ``"norm"`` or
``"prelu"``. The graph walk records a module of a registered kind as one op and reads its
widths from the entry, the FLOP counter attributes the FLOPs of every dense kind to it,
calibration views its input through the entry's ``as_samples``, and the surgery slices and
folds it with the entry's verbs — one entry, no other list to edit.

:func:`register_layer_kind` teaches skid a custom dense layer. Kinds of optional packages
(Hugging Face ``Conv1D``, timm's ``Linear`` and ``BatchNormAct2d``) are registered by their
qualified class name, so skid never imports those packages.
"""

from __future__ import annotations

import torch
from torch import nn

from . import _surgery

__all__ = ["register_layer_kind"]


def register_layer_kind(module_type: type, *, in_width, out_width, slice_out, fold_in,
                        as_samples=None) -> None:
    """Teach skid a dense layer that acts on the last axis, like ``nn.Linear``.

    After registration the graph walk treats ``module_type`` (and subclasses that keep its
    ``forward``) as a producer and consumer of channels, its FLOPs are attributed to it, the
    calibration reads its input, and the compressor slices and folds it.

    Parameters
    ----------
    module_type : type
        A subclass of ``torch.nn.Module`` whose ``forward`` maps ``(..., in_width)`` to
        ``(..., out_width)`` linearly in each row (plus a bias).
    in_width, out_width : callable
        ``in_width(module) -> int`` and ``out_width(module) -> int``: the input and output
        channels.
    slice_out : callable
        ``slice_out(module, keep)``, in place: keep only the output channels ``keep`` (a 1-D
        int64 tensor on the module's device, ascending) and update the module's metadata.
    fold_in : callable
        ``fold_in(module, T)``, in place: replace the input channels ``z`` (m,) by
        ``T.T @ z[keep]``, i.e. the weight ``W`` (out, m) acting as ``z ↦ W z`` becomes
        ``W Tᵀ`` (out, k). ``T`` is a float64 tensor of shape (k, m) on the weight's device;
        cast the result back to the weight's dtype. Both verbs assign new tensors (as in the
        example below) and never write into the old ones: the compressor's working copies of
        a model share tensor storage.
    as_samples : callable, optional
        ``as_samples(module, x) -> (rows, in_width)`` view of the layer's input; default
        ``x.reshape(-1, in_width(module))``.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> import skid.nn
    >>> class Transposed(nn.Module):  # stores its weight as (in, out)
    ...     def __init__(self, n_in, n_out):
    ...         super().__init__()
    ...         self.weight = nn.Parameter(torch.randn(n_in, n_out))
    ...     def forward(self, x):
    ...         return x @ self.weight
    >>> def slice_out(m, keep):
    ...     m.weight = nn.Parameter(m.weight.detach()[:, keep].contiguous())
    >>> def fold_in(m, T):
    ...     w = m.weight.detach()
    ...     m.weight = nn.Parameter((T @ w.double()).to(w.dtype))
    >>> skid.nn.register_layer_kind(
    ...     Transposed, in_width=lambda m: m.weight.shape[0],
    ...     out_width=lambda m: m.weight.shape[1], slice_out=slice_out, fold_in=fold_in)
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"module_type must be a torch.nn.Module subclass; got {module_type!r}")
    for name, func in (("in_width", in_width), ("out_width", out_width),
                       ("slice_out", slice_out), ("fold_in", fold_in)):
        if not callable(func):
            raise TypeError(f"{name} must be callable; got {func!r}")
    if as_samples is not None and not callable(as_samples):
        raise TypeError(f"as_samples must be callable or None; got {as_samples!r}")
    _surgery.KINDS_BY_TYPE[module_type] = _ChannelsLastKind(
        in_width, out_width, slice_out, fold_in, as_samples)


class _ChannelsLastKind:
    """A registered dense kind acting on the last axis (the user's functions, checked)."""

    walk = "linear"

    def __init__(self, in_width, out_width, slice_out, fold_in, as_samples):
        self._in, self._out = in_width, out_width
        self._slice_out, self._fold_in, self._as_samples = slice_out, fold_in, as_samples

    def out_width(self, module):
        return int(self._out(module))

    def in_width(self, module, positions=1):
        return _surgery.check_positions(int(self._in(module)), positions)

    def slice_out(self, module, keep):
        self._slice_out(module, keep)
        _check_width(module, self.out_width(module), len(keep), "slice_out", "output")

    def fold_in(self, module, T, positions=1):
        weight = _any_tensor(module)
        m = self.in_width(module, positions)
        T = _surgery.as_interpolation(T, weight, m)
        if positions > 1:  # channel-major flatten: every channel's positions move together
            T = torch.kron(T, torch.eye(positions, dtype=T.dtype, device=T.device))
        self._fold_in(module, T)
        _check_width(module, int(self._in(module)), T.shape[0], "fold_in", "input")

    def as_samples(self, module, x, positions=1):
        if self._as_samples is not None and positions == 1:
            return self._as_samples(module, x)
        m = self.in_width(module, positions)
        if positions == 1:
            return x.reshape(-1, m)
        return x.reshape(-1, m, positions).transpose(1, 2).reshape(-1, m)


def _any_tensor(module: nn.Module) -> torch.Tensor:
    for tensor in module.parameters():
        return tensor
    return torch.empty(0, dtype=torch.float64)


def _check_width(module, found: int, wanted: int, verb: str, side: str) -> None:
    if found != wanted:
        raise ValueError(f"the registered {verb} of {type(module).__name__} left {found} "
                         f"{side} channels where {wanted} were expected")


# ----------------------------------------------------------------------------------------
# Kinds of optional packages, registered by qualified class name (no import).

class _TransposedLinearKind:
    """Hugging Face ``Conv1D`` (GPT-2): ``y = x @ W + b`` with ``W`` stored (in, out)."""

    walk = "linear"

    def out_width(self, module):
        return module.nf

    def in_width(self, module, positions=1):
        return _surgery.check_positions(module.weight.shape[0], positions)

    def slice_out(self, module, keep):
        _surgery.take_entries(module, ("weight",), keep, dim=1)
        _surgery.take_entries(module, ("bias",), keep)
        module.nf = len(keep)

    def fold_in(self, module, T, positions=1):
        weight = module.weight.detach()
        m = self.in_width(module, positions)
        T = _surgery.as_interpolation(T, weight, m)
        w = weight.to(torch.float64).reshape(m, positions, -1)
        folded = _surgery.fold_channels(w, T, dim=0).reshape(-1, weight.shape[1])
        _surgery.set_tensor(module, "weight", folded.to(weight.dtype).contiguous())
        if hasattr(module, "nx"):
            module.nx = folded.shape[0]

    def bias_shift(self, module, b, positions=1):
        m = self.in_width(module, positions)
        w = module.weight.detach().to(torch.float64).reshape(m, positions, -1)
        return torch.einsum("mpo,m->o", w, b)

    def weight_gram(self, module, positions=1):
        m = self.in_width(module, positions)
        weight = module.weight.reshape(m, positions, -1).permute(2, 0, 1)  # (out, m, positions)
        return _surgery.gram_of_weight(weight)

    def as_samples(self, module, x, positions=1):
        m = self.in_width(module, positions)
        if positions == 1:
            return x.reshape(-1, m)
        return x.reshape(-1, m, positions).transpose(1, 2).reshape(-1, m)


_surgery.KINDS_BY_NAME.update({
    "transformers.pytorch_utils.Conv1D": _TransposedLinearKind(),
    # timm's Linear only overrides forward (a bias cast for TorchScript): an nn.Linear.
    "timm.layers.linear.Linear": _surgery.KINDS_BY_TYPE[nn.Linear],
    # BatchNorm2d followed by its own dropout and activation, all per channel.
    "timm.layers.norm_act.BatchNormAct2d": _surgery.KINDS_BY_TYPE[nn.BatchNorm2d],
})
