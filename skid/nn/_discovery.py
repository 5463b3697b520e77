"""The units a fit narrows and the blocks it calibrates one at a time, found on the work copy.

:func:`find_all_units` runs the finders ``prune`` asks for (channel groups and CNN residual
stages, attention heads, a transformer's residual stream) and returns the units in the order
the planner narrows them with every skip record; :func:`require_units` raises
:class:`~skid.exceptions.NotPrunableError` listing those records when nothing can be pruned;
:func:`block_layout` chooses the block-wise calibration's layout (or one pass).
"""

from __future__ import annotations

import contextlib

import torch

from ..exceptions import NotPrunableError
from . import _residual
from ._batches import run_model
from ._blocks import find_blocks
from ._head_discovery import (
    HeadProbes,
    find_heads,
    in_forward_order,
    needs_forms,
    release_heads,
)
from ._residual_stages import find_channel_groups
from ._unit_kinds import unit_kind

__all__ = ["block_layout", "find_all_units", "require_units"]


def find_all_units(work, example, settings) -> tuple[list, list]:
    """``(units, skipped)`` of the work copy for ``settings.prune``, in the planner's order.

    The finders run the model on ``example`` themselves; where one fails, a plain pass tells
    whether the model runs on that input at all, and if it does not, that is the error raised
    (the input is the caller's to fix). A pass of its own up front would cost every fit a
    forward pass.
    """
    try:
        return _find_all_units(work, example, settings)
    except Exception:
        args, kwargs = example
        with torch.no_grad():
            run_model(work, args, kwargs, what="first samples of the calibration data")
        raise


def _find_all_units(work, example, settings) -> tuple[list, list]:
    args, kwargs = example
    prune = settings.prune
    units, skipped = [], []
    traced = bool(prune & {"channels", "residual"})
    order = {}  # the probing pass's call order: no pass of its own to sort the units
    # the heads' probes ride on the channel trace's pass, unless a block would take a
    # pruning form first (the trace must see an nn.MultiheadAttention as it is)
    probes = None
    if "heads" in prune and traced and not needs_forms(work):
        probes = HeadProbes(work, exclude=settings.exclude, call_order=order)
    if traced:
        with probes if probes is not None else contextlib.nullcontext():
            units, skipped = find_channel_groups(
                work, args, kwargs, layers=settings.layers, exclude=settings.exclude,
                channels="channels" in prune, residual="residual" in prune)
    if "heads" in prune:
        if probes is None:
            heads, skipped_heads = find_heads(work, args, kwargs, exclude=settings.exclude,
                                              call_order=order)
        else:
            heads, skipped_heads = probes.result()
        if settings.layers != "auto":  # heads are named by their attention block
            wanted = {n if isinstance(n, str) else n[0] for n in settings.layers}
            dropped = [h for h in heads if h.attention not in wanted
                       and h.producer not in wanted]
            release_heads(work, dropped)
            heads = [h for h in heads if h not in dropped]
        units = in_forward_order(work, units + heads, args, kwargs, order)
        skipped += skipped_heads
    if "residual" in prune:  # after the rest: "sequential" sees them compressed first
        streams, skipped_stream = _residual.find(work, example, exclude=settings.exclude,
                                                 layers=settings.layers)
        if any(unit_kind(u).prune == "residual" for u in units):
            skipped_stream = []  # a CNN's streams were found: no transformer to miss
        units, skipped = units + streams, skipped + skipped_stream
    return units, skipped


def require_units(work, units, skipped, prune, verbose: bool) -> None:
    """Print the skip records (``verbose``); NotPrunableError listing them if no unit is left.
    ``prune`` is the estimator's parameter as the user gave it."""
    if verbose:
        for s in skipped:
            print(f"[NetworkCompressor] skipping {s.producer!r}: {s.reason}")
    if not units:
        reasons = "".join(f"\n  - {s.producer!r}: {s.reason}" for s in skipped)
        raise NotPrunableError(
            f"No prunable unit in this {type(work).__name__} (prune={prune!r}): no "
            f"Linear/Conv layer's output channels reach only following Linear/Conv layers "
            f"through per-channel operations and gates, no attention block's heads "
            f"and no residual stream can be pruned."
            f"{reasons or ' The model has no Linear/Conv layer.'}"
        )


def block_layout(work, example, settings, units, calls=None):
    """The block layout of the units (the stream aside), or None for one pass: with a
    stream, ``target_flops`` budgets it with the other units in one pass. ``calls``: what an
    :class:`~skid.nn._blocks.ExamplePass` recorded around :func:`find_all_units` (None: the
    layout records a pass of its own)."""
    others = [u for u in units if not _residual.is_residual(u)]
    if len(others) < len(units) and settings.blocks is not None and (
            settings.target_flops is not None or not others):
        if settings.blocks != "auto":
            raise ValueError(
                f"blocks={settings.blocks!r} with prune including 'residual' and "
                f"{'target_flops' if others else 'no other unit'}: the stream's width is "
                "budgeted with the other units in one pass over the model; use "
                "blocks='auto' or None.")
        return None
    return find_blocks(work, example, settings.blocks, others, calls)
