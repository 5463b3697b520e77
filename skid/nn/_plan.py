"""Frozen records shared by the graph walk, the calibration, the budget and the surgery.

They hold qualified module names (as in ``model.named_modules()``), never module objects,
so a plan made on one copy of a model applies to any other copy by name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Unit:
    """Channels created by one layer and consumed by exactly one linear layer.

    Attributes
    ----------
    producer : str
        ``nn.Linear`` or ``nn.Conv{1,2,3}d`` (groups=1) whose output channels are pruned.
    consumer : str
        ``nn.Linear`` or ``nn.Conv{1,2,3}d`` (groups=1) into whose input channels the
        interpolation matrix is folded.
    width : int
        Number of channels before pruning.
    passthroughs : tuple of str
        Modules between them with per-channel state that is sliced with the kept channels
        (BatchNorm, depthwise conv, PReLU), in forward order.
    positions : int
        Spatial positions per channel when a flatten lies between a conv producer and a
        Linear consumer (channel-major): ``consumer.in_features == width * positions``.
        1 otherwise.
    """

    producer: str
    consumer: str
    width: int
    passthroughs: tuple[str, ...] = ()
    positions: int = 1


@dataclass(frozen=True)
class Skipped:
    """A candidate producer that is left alone, and why (shown when ``verbose``)."""

    producer: str
    reason: str


@dataclass(frozen=True)
class Selection:
    """What the ID chose for one unit: kept channels (pivot order) and the fold.

    ``interpolation`` has shape ``(len(keep), unit.width)`` and is the identity on the
    columns ``keep``; the consumer's input ``z`` is replaced by ``interpolation.T @ z[keep]``.
    """

    unit: Unit
    keep: torch.Tensor
    interpolation: torch.Tensor
    error: float
