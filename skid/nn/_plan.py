"""Frozen records shared by the graph walk, the calibration, the budget and the surgery.

They hold qualified module names (as in ``model.named_modules()``), never module objects,
so a plan made on one copy of a model applies to any other copy by name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Consumer:
    """A dense layer that reads a channel group's channels on its input.

    Attributes
    ----------
    name : str
        Qualified module name (``Linear``/``Conv`` with groups=1, or a registered kind).
    positions : int
        Spatial positions per channel when a flatten lies between the channels and a
        ``Linear`` (channel-major): ``in_features == width * positions``. 1 otherwise.
    reads : int
        Which of the group's member tensors the consumer reads, numbered in forward order of
        first reading. Consumers with the same number see the same rows and share one
        statistic; a group whose consumers read several tensors (the SE gate's ``fc1`` reads
        the pooled activations, the projection the gated ones) has one statistic per number.
    before : tuple of (str or int)
        When the consumer reads a concatenation, what precedes the group's channels in it:
        module names (whose current output width counts) and fixed widths. Their sum is the
        offset of the group's channels in the consumer's input (see ``_surgery.offset_of``).
    """

    name: str
    positions: int = 1
    reads: int = 0
    before: tuple = ()


@dataclass(frozen=True)
class ChannelGroup:
    """One prunable width: channels created by one or more producers, read by consumers.

    The producers' outputs are joined by elementwise products (a gated MLP's
    ``act(gate(x)) * up(x)``, a squeeze-excitation gate ``x * sigmoid(fc2(...))``) and pass
    through per-channel ops; every tensor computed from them carries the same channels. One
    selection ``J`` of channels is kept in every producer and per-channel op, and each
    consumer gets its own interpolation matrix folded into its input channels.

    Attributes
    ----------
    producers : tuple of str
        Layers whose output channels are the group's channels, in forward order.
    consumers : tuple of Consumer
        Dense layers reading the channels, in forward order.
    width : int
        Number of channels before pruning.
    passthroughs : tuple of str
        Modules between them with per-channel state that is sliced with the kept channels
        (BatchNorm, depthwise conv, PReLU), in forward order.
    offsets : tuple of (str, tuple)
        ``(passthrough, before)`` for passthroughs acting on a concatenation: what precedes
        the group's channels there, as in :attr:`Consumer.before`.
    blocks : int
        Equal channel blocks of a grouped convolution producing or consuming the channels:
        each block keeps the same number of channels, and ``T`` is block-diagonal.
    kind : str
        What a unit of ``width`` is: ``"channels"``, or ``"residual_stage"`` for the
        residual stream of a CNN stage (producers joined by residual adds).
    """

    producers: tuple[str, ...]
    consumers: tuple[Consumer, ...]
    width: int
    passthroughs: tuple[str, ...] = ()
    offsets: tuple = ()
    blocks: int = 1
    kind: str = "channels"

    @property
    def producer(self) -> str:
        """The first producer (the one-producer view kept for existing code)."""
        return self.producers[0]

    @property
    def consumer(self) -> str:
        """The first consumer's name."""
        return self.consumers[0].name

    @property
    def positions(self) -> int:
        """The first consumer's positions per channel."""
        return self.consumers[0].positions

    @property
    def n_readings(self) -> int:
        """Number of distinct member tensors read by consumers (one statistic each)."""
        return 1 + max(c.reads for c in self.consumers)

    def before(self, name: str) -> tuple:
        """What precedes the group's channels in module ``name``'s channels (() at 0)."""
        for consumer in self.consumers:
            if consumer.name == name:
                return consumer.before
        return dict(self.offsets).get(name, ())

    def modules(self) -> tuple[str, ...]:
        """Every module the group changes: producers, passthroughs, consumers."""
        return (*self.producers, *self.passthroughs, *(c.name for c in self.consumers))


def Unit(producer: str, consumer: str, width: int, passthroughs: tuple[str, ...] = (),
         positions: int = 1) -> ChannelGroup:
    """The channel group of one producer read by one consumer (the common case)."""
    return ChannelGroup((producer,), (Consumer(consumer, positions),), width,
                        tuple(passthroughs))


@dataclass(frozen=True)
class Skipped:
    """A candidate producer that is left alone, and why (shown when ``verbose``)."""

    producer: str
    reason: str


@dataclass(frozen=True)
class Selection:
    """What the ID chose for one group: kept channels (pivot order) and the folds.

    ``interpolation`` has shape ``(len(keep), unit.width)`` and is the identity on the
    columns ``keep``; a consumer's input ``z`` is replaced by ``interpolation.T @ z[keep]``.
    ``interpolations``, when given, holds one such matrix per consumer of the group (in the
    order of ``unit.consumers``); None means ``interpolation`` for every consumer.
    ``intercepts`` (``fit_intercept``), when given, holds per consumer the constant ``b``
    (shape ``(unit.width,)``) added to its input, ``z ≈ interpolation.T @ z[keep] + b``; it
    folds into the consumer's bias.
    """

    unit: ChannelGroup
    keep: torch.Tensor
    interpolation: torch.Tensor
    error: float
    interpolations: tuple | None = None
    intercepts: tuple | None = None

    def interpolation_for(self, index: int):
        """The interpolation matrix folded into consumer ``index``."""
        if self.interpolations is None:
            return self.interpolation
        return self.interpolations[index]
