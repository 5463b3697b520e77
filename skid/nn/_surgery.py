"""Channel surgery: slice producers and per-channel ops, fold the interpolation into consumers.

Offers one registry of small, stateless entries, one per layer kind, looked up along
``type(module).__mro__`` (by class, or by qualified class name for optional packages' kinds,
see :mod:`skid.nn._kinds`). An entry's ``walk`` attribute (``"linear"``, ``"conv"``, ``"norm"``,
``"prelu"``) is the kind's role in the graph walk, so the walk, the FLOP attribution and the
calibration all read the kind from here. The verbs the ID needs:

- :func:`slice_out` — keep some output channels of a producer (``Linear``, ``Conv``; a grouped
  conv keeps the same number in each group);
- :func:`slice_channels` — keep the same channels of a per-channel op in between
  (``BatchNorm``, ``InstanceNorm``, depthwise ``Conv``, ``PReLU``);
- :func:`fold_in` — fold ``T`` into a consumer's input channels, ``W ← W Tᵀ`` (``Linear``,
  ``Conv`` of any kernel size, group by group for a block-diagonal ``T``; for flatten →
  ``Linear`` the weight is viewed as ``(out, channels, positions)`` and contracted over the
  channel axis — no Kronecker product);
- :func:`as_samples` — view a consumer's input as the ``(rows, channels)`` matrix ``Z`` of
  the ID ``Z ≈ Z[:, keep] @ T``;
- :func:`apply_selection` — apply one :class:`~skid.nn._plan.Selection` (a channel group:
  every producer, passthrough and consumer, the group's part of a concatenation at its current
  offset) to a model by name.

Every verb updates the module's metadata (``out_features``, ``in_channels``,
``num_features``, ``groups`` ...) together with its tensors, and builds the new tensors with
the weight's dtype and device: it replaces a module's tensors and never writes into them, so
a :func:`sharing_copy` of a model can be compressed without touching the model. A new layer
kind is one decorated class::

    @register_surgery(MyLinear)
    class _MyLinearSurgery:
        def slice_out(self, module, keep): ...
"""

from __future__ import annotations

import copy

import numpy as np
import scipy.linalg
import torch
from torch import nn

from ._plan import Selection

__all__ = [
    "apply_selection",
    "as_samples",
    "concat_widths",
    "fold_constant",
    "fold_in",
    "offset_of",
    "register_surgery",
    "sharing_copy",
    "slice_channels",
    "slice_out",
    "surgery_for",
    "weight_gram",
]

KINDS_BY_TYPE: dict[type, object] = {}
# Kinds of optional packages, by ``f"{cls.__module__}.{cls.__qualname__}"`` (never imported).
KINDS_BY_NAME: dict[str, object] = {}
_VERBS = ("slice_out", "slice_channels", "fold_in", "as_samples", "weight_gram", "bias_shift")
_WIDTH_OF = {"slice_out": "out_width", "slice_channels": "out_width", "fold_in": "in_width"}


def sharing_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s modules over the same tensor storage.

    The verbs replace tensors and never write into them, so folding a selection into the copy
    leaves ``model`` as it was, and the copy costs only what is folded into it, not a model.
    Each parameter gets a parameter object of its own (over the same data), so moving one of
    the two models to another device (``Module.to`` swaps a parameter's ``.data``) does not
    move the other; ties between parameters are kept.
    """
    memo = {id(p): nn.Parameter(p.data, requires_grad=p.requires_grad)
            for p in model.parameters()}
    memo.update((id(b), b) for b in model.buffers())  # ``Module.to`` replaces buffers
    return copy.deepcopy(model, memo)


def register_surgery(*types: type):
    """Class decorator: register one stateless instance of the class for these module types.

    The class implements any of the verbs ``slice_out(module, keep)``,
    ``slice_channels(module, keep)``, ``fold_in(module, T, positions)`` and
    ``as_samples(module, x, positions)``; the verbs it has are the roles the kind can play.
    Producers and passthroughs also give ``out_width(module)`` (None: any width), consumers
    ``in_width(module, positions)``, so a plan is checked before anything changes.
    """
    def decorate(cls):
        if not any(callable(getattr(cls, verb, None)) for verb in _VERBS):
            raise TypeError(f"{cls.__name__} implements none of the verbs {_VERBS}")
        entry = cls()
        for module_type in types:
            KINDS_BY_TYPE[module_type] = entry
        return cls
    return decorate


def surgery_for(module: nn.Module, verb: str | None = None):
    """The registry entry for ``module`` (nearest registered class in its MRO).

    Raises TypeError when no entry exists or the entry lacks ``verb``.
    """
    for cls in type(module).__mro__:
        entry = registered(cls)
        if entry is not None:
            if verb is not None and not callable(getattr(entry, verb, None)):
                raise TypeError(f"{type(module).__name__} does not support `{verb}`; it can "
                                f"do: {', '.join(v for v in _VERBS if hasattr(entry, v))}")
            return entry
    raise TypeError(f"skid has no surgery for {type(module).__name__}; supported kinds: "
                    f"{', '.join(sorted(t.__name__ for t in KINDS_BY_TYPE))}")


def registered(cls: type):
    """The entry registered for exactly this class (by type, or by qualified name), or None."""
    entry = KINDS_BY_TYPE.get(cls)
    if entry is None:
        entry = KINDS_BY_NAME.get(f"{cls.__module__}.{cls.__qualname__}")
    return entry


def slice_out(module: nn.Module, keep) -> None:
    """Keep the output channels ``keep`` of a producer, in place."""
    surgery_for(module, "slice_out").slice_out(module, _index(keep, module))


def slice_channels(module: nn.Module, keep) -> None:
    """Keep the channels ``keep`` of a per-channel op (BatchNorm, depthwise conv ...)."""
    surgery_for(module, "slice_channels").slice_channels(module, _index(keep, module))


def fold_in(module: nn.Module, T, positions: int = 1) -> None:
    """Make a consumer take the kept channels: ``W ← W Tᵀ`` over its input-channel axis.

    Parameters
    ----------
    module : nn.Linear or nn.Conv{1,2,3}d (groups=1)
        The consumer, changed in place; ``in_features``/``in_channels`` becomes ``k``.
    T : array-like of shape (k, m)
        Interpolation matrix (NumPy or torch, any float dtype, any device): the consumer's
        input channels ``z`` (m,) are replaced by ``T.T @ z[keep]``. The contraction runs in
        float64 on the weight's device and is cast back to the weight's dtype.
    positions : int, default=1
        For a Linear after a channel-major flatten: positions per channel. The weight is
        viewed as ``(out, m, positions)`` and contracted over ``m`` (no Kronecker product).
    """
    surgery_for(module, "fold_in").fold_in(module, T, positions)


def fold_constant(module: nn.Module, b, positions: int = 1) -> None:
    """Make a consumer take a constant ``b`` added to its input channels: ``c ← c + W b``.

    ``fit_intercept`` replaces the consumer's input ``z`` by ``Tᵀ z[keep] + b``; the weights
    see ``W Tᵀ`` (:func:`fold_in`) and the bias gets ``W b``, computed from the weight as it is
    *before* the fold. A consumer without a bias gets one (zeros plus the shift), in the
    weight's dtype and on its device. For a convolution the shift sums the kernel taps, exact
    away from zero padding (at a padded border the taps outside read zeros, not ``b``).

    Parameters
    ----------
    module : nn.Module
        A consumer whose kind has ``bias_shift`` (Linear, Conv, Hugging Face Conv1D).
    b : array-like of shape (m,)
        The constant per input channel.
    positions : int, default=1
        As in :func:`fold_in`: the constant repeats over a flattened input's positions.
    """
    weight = module.weight.detach()
    b = torch.as_tensor(np.asarray(b) if not torch.is_tensor(b) else b)
    b = b.detach().to(device=weight.device, dtype=torch.float64).reshape(-1)
    shift = surgery_for(module, "bias_shift").bias_shift(module, b, positions)
    bias = getattr(module, "bias", None)
    total = shift if bias is None else bias.detach().to(torch.float64) + shift
    new = total.to(weight.dtype).contiguous()
    if bias is None:
        module.bias = nn.Parameter(new, requires_grad=weight.requires_grad)
    else:
        set_tensor(module, "bias", new)


def weight_gram(module: nn.Module, positions: int = 1) -> np.ndarray:
    """``WᵀW`` of a consumer over its input channels (m × m, float64 NumPy).

    Summed over output channels and kernel or flattened positions. For a Linear on
    unflattened input the output error of replacing each row ``z`` of ``Z`` by ``ẑ`` is exactly
    ``Σ (z − ẑ)ᵀ WᵀW (z − ẑ)``; for convolutions and flattened inputs, where one output mixes
    several rows, this leaves out the cross terms between kernel/flattened positions.
    """
    return surgery_for(module, "weight_gram").weight_gram(module, positions)


def as_samples(module: nn.Module, x: torch.Tensor, positions: int = 1) -> torch.Tensor:
    """View a consumer's input as the matrix ``Z`` of the ID ``Z ≈ Z[:, keep] @ T``.

    Parameters
    ----------
    module : nn.Linear or nn.Conv{1,2,3}d (groups=1)
        The consumer.
    x : torch.Tensor
        Its input: ``(..., in_features)`` for a Linear, ``(N, C, *spatial)`` for a conv.
    positions : int, default=1
        Positions per channel of a flattened Linear input (``in_features = m · positions``).

    Returns
    -------
    Z : torch.Tensor of shape (rows, m)
        One row per sample and position (leading axes, then spatial positions or flattened
        positions, in row-major order), one column per channel; same dtype and device as
        ``x``, a view where the layout allows.
    """
    return surgery_for(module, "as_samples").as_samples(module, x, positions)


# ----------------------------------------------------------------------------------------
# Tensor helpers

def _index(keep, module: nn.Module) -> torch.Tensor:
    """``keep`` as a 1-D int64 tensor on the module's device."""
    keep = torch.as_tensor(np.asarray(keep) if not torch.is_tensor(keep) else keep)
    device = next(iter(module.parameters()), torch.empty(0)).device
    return keep.to(device=device, dtype=torch.int64).reshape(-1)


def set_tensor(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace a parameter (keeping ``requires_grad``) or a buffer of ``module``."""
    old = getattr(module, name)
    if isinstance(old, nn.Parameter):
        setattr(module, name, nn.Parameter(value, requires_grad=old.requires_grad))
    else:
        setattr(module, name, value)


def take_entries(module: nn.Module, names, keep: torch.Tensor, dim: int = 0) -> None:
    """Keep the entries ``keep`` along ``dim`` of every named tensor that is not None."""
    for name in names:
        tensor = getattr(module, name, None)
        if tensor is not None:
            set_tensor(module, name, tensor.detach().index_select(dim, keep).contiguous())


def as_interpolation(T, weight: torch.Tensor, m: int) -> torch.Tensor:
    """``T`` as a float64 tensor on the weight's device; check it has ``m`` columns."""
    T = torch.as_tensor(np.asarray(T) if not torch.is_tensor(T) else T)
    T = T.detach().to(device=weight.device, dtype=torch.float64)
    if T.ndim != 2 or T.shape[1] != m:
        raise ValueError(f"T must have shape (k, {m}); got {tuple(T.shape)}")
    return T


def fold_channels(w: torch.Tensor, T: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """``w`` with its channel axis ``dim`` (m) contracted with ``T`` (k, m), both float64:
    ``out[.., i, ..] = Σ_j T[i, j] w[.., j, ..]``, the axis now of length k.

    A plain ID's ``T`` is the identity on the kept columns: a column of ``T`` with one nonzero,
    an exact 1, is added into its row, and only the other columns are multiplied (at 1,371 of
    1,536 kept, 9× fewer flops than the dense product; equal to it up to rounding).
    """
    w = w.movedim(dim, -1)
    rows, columns = (T == 1).nonzero(as_tuple=True)  # row-major scans: column ones are slow
    alone = (T != 0).sum(0, dtype=torch.int32)[columns] == 1
    rows, columns = rows[alone], columns[alone]
    rest = torch.ones(T.shape[1], dtype=torch.bool, device=T.device)
    rest[columns] = False
    out = w[..., rest] @ T[:, rest].T
    out.index_add_(out.ndim - 1, rows, w[..., columns])
    return out.movedim(-1, dim)


def gram_of_weight(w: torch.Tensor) -> np.ndarray:
    """``Σ WᵀW`` over the output and spatial axes of a weight viewed as (out, m, rest)."""
    w = w.detach().to(torch.float64)
    return torch.einsum("omr,onr->mn", w, w).cpu().numpy()


def check_positions(in_features: int, positions: int) -> int:
    """Channels of a flattened input: ``in_features / positions``, which must be exact."""
    if positions < 1 or in_features % positions:
        raise ValueError(f"in_features={in_features} is not a multiple of "
                         f"positions={positions}")
    return in_features // positions


# ----------------------------------------------------------------------------------------
# Registry entries

@register_surgery(nn.Linear)
class _LinearSurgery:
    """Producer (rows of W and b) and consumer (columns of W, flattened or not)."""

    walk = "linear"

    def out_width(self, module: nn.Linear):
        return module.out_features

    def in_width(self, module: nn.Linear, positions=1):
        return check_positions(module.in_features, positions)

    def slice_out(self, module: nn.Linear, keep):
        take_entries(module, ("weight", "bias"), keep)
        module.out_features = len(keep)

    def fold_in(self, module: nn.Linear, T, positions=1):
        weight = module.weight.detach()
        m = check_positions(module.in_features, positions)
        T = as_interpolation(T, weight, m)
        w = weight.to(torch.float64).reshape(module.out_features, m, positions)
        folded = fold_channels(w, T).reshape(module.out_features, -1)
        set_tensor(module, "weight", folded.to(weight.dtype).contiguous())
        module.in_features = folded.shape[1]

    def bias_shift(self, module: nn.Linear, b, positions=1):
        m = check_positions(module.in_features, positions)
        w = module.weight.detach().to(torch.float64).reshape(module.out_features, m, positions)
        return torch.einsum("omp,m->o", w, b)

    def weight_gram(self, module: nn.Linear, positions=1):
        m = check_positions(module.in_features, positions)
        return gram_of_weight(module.weight.reshape(module.out_features, m, positions))

    def as_samples(self, module: nn.Linear, x, positions=1):
        m = check_positions(module.in_features, positions)
        if positions == 1:
            return x.reshape(-1, m)
        return x.reshape(-1, m, positions).transpose(1, 2).reshape(-1, m)


@register_surgery(nn.Conv1d, nn.Conv2d, nn.Conv3d)
class _ConvSurgery:
    """Producer and consumer when ``groups == 1``; depthwise (one filter per channel):
    a per-channel passthrough."""

    walk = "conv"

    def out_width(self, module):
        return module.out_channels

    def in_width(self, module, positions=1):
        return module.in_channels

    def slice_out(self, module, keep):
        _equal_per_group(keep, module.out_channels, module.groups, "output")
        take_entries(module, ("weight", "bias"), keep)
        module.out_channels = len(keep)

    def slice_channels(self, module, keep):
        _require_groups(module, dense=False, verb="slice_channels")
        take_entries(module, ("weight", "bias"), keep)
        module.in_channels = module.out_channels = module.groups = len(keep)

    def fold_in(self, module, T, positions=1):
        """``W ← W Tᵀ``; for ``groups > 1``, ``T`` is block-diagonal and folds group by group."""
        if positions != 1:
            raise ValueError(f"a convolution consumer takes positions=1; got {positions}")
        weight = module.weight.detach()
        T = as_interpolation(T, weight, module.in_channels)
        blocks = _diagonal_blocks(T, module.groups)
        outputs = module.out_channels // module.groups
        folded = torch.cat([fold_channels(weight[g * outputs:(g + 1) * outputs].double(), block)
                            for g, block in enumerate(blocks)])
        set_tensor(module, "weight", folded.to(weight.dtype).contiguous())
        module.in_channels = T.shape[0]

    def bias_shift(self, module, b, positions=1):
        _require_groups(module, dense=True, verb="bias_shift")
        w = module.weight.detach().to(torch.float64).flatten(2)  # (out, in, taps)
        return torch.einsum("omt,m->o", w, b)

    def weight_gram(self, module, positions=1):
        """Block-diagonal for ``groups > 1``: each group's outputs read only its channels."""
        size, outputs = module.in_channels // module.groups, module.out_channels // module.groups
        weight = module.weight.reshape(module.out_channels, size, -1)
        return scipy.linalg.block_diag(*[
            gram_of_weight(weight[g * outputs:(g + 1) * outputs]) for g in range(module.groups)])

    def as_samples(self, module, x, positions=1):
        channel_axis = x.ndim - len(module.kernel_size) - 1  # 0 for unbatched input
        return x.movedim(channel_axis, -1).reshape(-1, module.in_channels)


def _equal_per_group(keep: torch.Tensor, width: int, groups: int, side: str) -> None:
    """A grouped conv keeps the same number of channels in each group."""
    if groups == 1:
        return
    counts = torch.bincount(keep.cpu() // (width // groups), minlength=groups)
    if len(keep) % groups or not bool((counts == len(keep) // groups).all()):
        raise ValueError(f"keep must hold an equal number of {side} channels in each of the "
                         f"{groups} groups of the convolution; got {counts.tolist()}")


def _diagonal_blocks(T: torch.Tensor, groups: int) -> list[torch.Tensor]:
    """The ``groups`` diagonal blocks of a block-diagonal ``T`` (rows sorted by channel)."""
    k, m = T.shape
    if groups == 1:
        return [T]
    if k % groups or m % groups:
        raise ValueError(f"T of shape {(k, m)} does not split into {groups} groups")
    rows, cols = k // groups, m // groups
    blocks = [T[g * rows:(g + 1) * rows, g * cols:(g + 1) * cols] for g in range(groups)]
    mask = torch.block_diag(*[torch.ones_like(b) for b in blocks]).bool()
    outside = T.masked_select(~mask)
    if outside.numel() and bool(outside.abs().max() > 0):
        raise ValueError(f"T must be block-diagonal over the {groups} groups of the "
                         "convolution it is folded into")
    return blocks


def _require_groups(conv: nn.Module, dense: bool, verb: str) -> None:
    """Dense verbs need ``groups == 1``; slice_channels needs a depthwise conv."""
    depthwise = conv.groups == conv.in_channels == conv.out_channels
    if (conv.groups == 1) if dense else depthwise:
        return
    wanted = "groups=1" if dense else "groups == in_channels == out_channels (depthwise)"
    raise TypeError(f"`{verb}` needs a convolution with {wanted}; got groups={conv.groups}, "
                    f"in_channels={conv.in_channels}, out_channels={conv.out_channels}")


@register_surgery(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
                  nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
class _ChannelNormSurgery:
    """Per-channel affine parameters and running statistics."""

    walk = "norm"

    def out_width(self, module):
        return module.num_features

    def slice_channels(self, module, keep):
        take_entries(module, ("weight", "bias", "running_mean", "running_var"), keep)
        module.num_features = len(keep)


@register_surgery(nn.PReLU)
class _PReLUSurgery:
    """One slope per channel (``num_parameters > 1``); a shared slope needs no slicing."""

    walk = "prelu"

    def out_width(self, module):
        return module.num_parameters if module.num_parameters > 1 else None

    def slice_channels(self, module, keep):
        if module.num_parameters > 1:
            take_entries(module, ("weight",), keep)
            module.num_parameters = len(keep)


# ----------------------------------------------------------------------------------------
# Applying a plan

def apply_selection(model: nn.Module, selection: Selection) -> nn.Module:
    """Apply one group's selection to ``model`` in place, looking modules up by name.

    Every producer keeps the output channels ``selection.keep``, every passthrough keeps the
    same channels, and each consumer gets its interpolation matrix folded in. Kept channels
    stay in their original order (``keep`` is sorted and the rows of ``T`` permuted to
    match). Everything is checked before any module is changed.

    Parameters
    ----------
    model : torch.nn.Module
        The model to change (the compressor passes its own deep copy).
    selection : Selection
        ``keep`` of shape (k,) in pivot order, interpolation matrices of shape
        (k, unit.width).

    Returns
    -------
    model : torch.nn.Module
        The same object, narrower.

    Raises
    ------
    TypeError
        If a module of the group has no surgery for its role.
    ValueError
        If ``keep``/``interpolation`` do not fit the group or the modules' widths.
    """
    unit = selection.unit
    keep, order = _sorted_keep(selection)
    folds = [_sorted_interpolation(selection.interpolation_for(i), keep, order, unit.width)
             for i in range(len(unit.consumers))]
    producers = [_module(model, name, "slice_out", unit.width) for name in unit.producers]
    passthroughs = [_module(model, name, "slice_channels", unit.width,
                            before=unit.before(name)) for name in unit.passthroughs]
    consumers = [_module(model, c.name, "fold_in", unit.width, c.positions, c.before)
                 for c in unit.consumers]
    offsets = {name: offset_of(model, unit.before(name))
               for name in (*unit.passthroughs, *(c.name for c in unit.consumers))}
    if selection.intercepts is not None:
        for module in consumers:  # fit_intercept: every consumer must take the constant
            surgery_for(module, "bias_shift")
    for module in producers:
        slice_out(module, keep)
    for name, module in zip(unit.passthroughs, passthroughs, strict=True):
        slice_channels(module, _around(keep, offsets[name], unit.width, _width(module)))
    intercepts = selection.intercepts or (None,) * len(consumers)
    for module, consumer, T, b in zip(consumers, unit.consumers, folds, intercepts,
                                      strict=True):
        total = surgery_for(module).in_width(module, consumer.positions)
        if b is not None:  # W b from the weight before the fold
            fold_constant(module, _embed_constant(b, offsets[consumer.name], total),
                          consumer.positions)
        fold_in(module, _embed(T, offsets[consumer.name], total), consumer.positions)
    return model


def concat_widths(model: nn.Module, units) -> dict[str, int]:
    """Channels of every module that reads or passes through a group inside a concatenation."""
    widths = {}
    for unit in units:
        for consumer in unit.consumers:
            if consumer.before:
                module = model.get_submodule(consumer.name)
                widths[consumer.name] = surgery_for(module).in_width(module, consumer.positions)
        for name, _ in unit.offsets:
            widths[name] = _width(model.get_submodule(name))
    return widths


def _width(module: nn.Module) -> int:
    """Current channels of a per-channel module (None: any; then the kept ones suffice)."""
    return surgery_for(module).out_width(module)


def _around(keep: np.ndarray, offset: int, width: int, total) -> np.ndarray:
    """``keep`` shifted to ``offset`` in an axis of ``total`` channels, the others all kept."""
    if not offset and (total is None or total == width):
        return keep
    return np.concatenate([np.arange(offset), offset + keep, np.arange(offset + width, total)])


def _embed(T: torch.Tensor, offset: int, total: int) -> torch.Tensor:
    """``T`` (k, m) acting on channels ``offset:offset+m`` of ``total``; identity elsewhere."""
    k, m = T.shape
    if not offset and total == m:
        return T
    full = torch.zeros(total - m + k, total, dtype=T.dtype)
    full[:offset, :offset] = torch.eye(offset, dtype=T.dtype)
    full[offset:offset + k, offset:offset + m] = T
    rest = total - offset - m
    full[offset + k:, offset + m:] = torch.eye(rest, dtype=T.dtype)
    return full


def _embed_constant(b, offset: int, total: int) -> torch.Tensor:
    """The constant ``b`` (m,) of a group at ``offset`` of ``total`` channels; 0 elsewhere."""
    b = torch.as_tensor(np.asarray(b) if not torch.is_tensor(b) else b).reshape(-1)
    full = torch.zeros(total, dtype=torch.float64)
    full[offset:offset + b.numel()] = b.to(torch.float64)
    return full


def _sorted_keep(selection: Selection) -> tuple[np.ndarray, np.ndarray]:
    """Validated ``keep`` (ascending) and the order that sorts it."""
    width = selection.unit.width
    keep = np.asarray(selection.keep.cpu() if torch.is_tensor(selection.keep)
                      else selection.keep).reshape(-1)
    if keep.size == 0 or not np.issubdtype(keep.dtype, np.integer):
        raise ValueError(f"keep must be a non-empty array of channel indices; got {keep!r}")
    if keep.min() < 0 or keep.max() >= width or np.unique(keep).size != keep.size:
        raise ValueError(f"keep must hold distinct channel indices in [0, {width}); got {keep}")
    order = np.argsort(keep, kind="stable")
    return keep[order], order


def _sorted_interpolation(T, keep: np.ndarray, order: np.ndarray, width: int) -> torch.Tensor:
    """``T`` checked to be (k, width), its rows permuted to match the sorted ``keep``."""
    T = T.detach().cpu() if torch.is_tensor(T) else torch.as_tensor(np.asarray(T))
    if tuple(T.shape) != (keep.size, width):
        raise ValueError(f"interpolation must have shape ({keep.size}, {width}) for "
                         f"{keep.size} kept channels; got {tuple(T.shape)}")
    return T[torch.as_tensor(order)]


def _module(model: nn.Module, name: str, verb: str, width: int,
            positions: int = 1, before: tuple = ()) -> nn.Module:
    """``model.get_submodule(name)``, checked to support ``verb`` on ``width`` channels.

    With ``before`` (a concatenation), the module holds more channels: they must include the
    group's at its current offset.
    """
    try:
        module = model.get_submodule(name)
    except AttributeError as error:
        raise ValueError(f"the model has no module {name!r}") from error
    entry = surgery_for(module, verb)
    if isinstance(module, nn.modules.conv._ConvNd) and verb == "slice_channels":
        _require_groups(module, dense=False, verb=verb)
    getter = getattr(entry, _WIDTH_OF[verb])
    found = getter(module, positions) if verb == "fold_in" else getter(module)
    if before:
        needed = offset_of(model, before) + width
        if found is not None and found < needed:
            raise ValueError(f"{name!r} ({type(module).__name__}) has {found} channels, fewer "
                             f"than the {needed} the group's offset needs")
    elif found is not None and found != width:
        raise ValueError(f"{name!r} ({type(module).__name__}) has {found} channels where the "
                         f"group has {width}; was the plan made for another model?")
    return module


def offset_of(model, before: tuple) -> int:
    """The current offset of a group's channels in a concatenation, on ``model``.

    ``before`` lists what precedes them (see :attr:`Consumer.before`): a module name counts
    its current output width (so the offset follows the pruning of the other parts), an int
    counts itself.
    """
    total = 0
    for source in before:
        if isinstance(source, str):
            module = model.get_submodule(source)
            total += int(surgery_for(module).out_width(module))
        else:
            total += int(source)
    return total
