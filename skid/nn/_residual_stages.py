"""CNN residual stages as one unit each: the channels of the stream between two downsamples.

A ResNet/ResNeXt/RegNet stage, or a MobileNetV2/EfficientNet projection stream, adds the
outputs of several producers into one tensor: the stage's first writer (the stem conv, or the
stage's projection shortcut) and every block's last conv, each through its per-channel
BatchNorm. Every block's first conv, the next stage's downsample and first conv, or the pooled
classifier read it. The graph walk (:func:`skid.nn._graph.find_units` with ``residual=True``)
follows the channels through those adds as it follows a gate's product, so the stage is one
:class:`~skid.nn._plan.ChannelGroup` of kind ``"residual_stage"`` (its ``layers_`` row says
``"residual"``, as a transformer stream's): every writer (and its BatchNorm) keeps the same
channels ``J`` — an identity shortcut then adds ``J`` to ``J`` — per-channel ops after an add
(ReLU) and per-channel readers (a depthwise conv, a pre-activation BatchNorm) are sliced with
them, and each dense reader gets its own least-squares ``T``. The readers see
different tensors (one per block), so ``J`` is the joint ID of their readings, each weighted to
unit norm (:class:`~skid.nn._joint.JointFactorization`); calibration, budgets and surgery are
those of any multi-reading channel group.

A ReLU or BatchNorm after the add acts per channel, so a rotation of the stream (the
transformer streams' ``stream="rotate"``) does not apply here: CNN stages are always selected.
"""

from __future__ import annotations

from ._graph import find_units

__all__ = ["find_channel_groups"]


def find_channel_groups(model, args, kwargs, *, layers="auto", exclude=(), channels=True,
                        residual=False):
    """The channel groups ``prune`` asks for, and the skip record of every other candidate.

    Parameters
    ----------
    model : torch.nn.Module
    args, kwargs
        One small example batch, as ``model(*args, **kwargs)``.
    layers, exclude
        As :func:`skid.nn._graph.find_units`.
    channels : bool, default=True
        Keep the groups inside residual blocks (MLP widths, block interiors).
    residual : bool, default=False
        Follow the channels through residual adds and keep the residual streams found.

    Returns
    -------
    units : list of ChannelGroup
        In forward order; ``kind`` is ``"channels"`` or ``"residual_stage"``.
    skipped : list of Skipped
        Every candidate producer left alone, with the reason.
    """
    units, skipped = find_units(model, args, kwargs, layers=layers, exclude=exclude,
                                residual=residual)
    if not channels:
        units = [unit for unit in units if unit.kind == "residual_stage"]
    return units, skipped
