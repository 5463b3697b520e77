"""Pruning baselines at the ID's widths, through skid's own surgery (not part of skid).

The consumer just drops the channels (or heads) it no longer gets: ``T`` is the identity rows
of the kept ones. With the ID's own choice this is "ID without T" — what the fold adds — and
with a magnitude ranking it is what weight-magnitude pruning (Torch-Pruning's importance)
keeps.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from skid.nn._heads import HeadSelection, apply_head_selection
from skid.nn._plan import Selection
from skid.nn._surgery import apply_selection

__all__ = ["heads_sliced", "magnitude_heads", "sliced"]


def sliced(model, units, keeps) -> torch.nn.Module:
    """A deep copy keeping channels ``keeps[i]`` of unit ``i``; consumers drop the others."""
    pruned = copy.deepcopy(model)
    for unit, keep in zip(units, keeps, strict=True):
        keep = torch.as_tensor(np.sort(keep), dtype=torch.int64)
        identity_rows = torch.eye(unit.width, dtype=torch.float64)[keep]
        apply_selection(pruned, Selection(unit, keep, identity_rows, float("nan")))
    return pruned.eval()


def heads_sliced(model, selections) -> torch.nn.Module:
    """A deep copy keeping each block's heads of ``selections``; the output projection drops
    the other heads' columns."""
    pruned = copy.deepcopy(model)
    for s in selections:
        unit = s.unit
        columns = (s.heads[:, None] * unit.head_dim + np.arange(unit.head_dim)).ravel()
        identity_rows = np.eye(unit.n_heads * unit.head_dim)[columns]
        apply_head_selection(pruned, HeadSelection(unit, s.heads, s.kv_heads, identity_rows,
                                                   float("nan")))
    return pruned.eval()


def magnitude_heads(model, selection) -> HeadSelection:
    """As many heads as ``selection`` (the same number per key/value group, in the same groups),
    chosen by the squared L2 norm of each head's query rows and output-projection columns."""
    unit = selection.unit
    q = model.get_submodule(unit.producer).weight.detach()
    o = model.get_submodule(unit.consumer).weight.detach()
    d = unit.head_dim
    score = (q.pow(2).reshape(unit.n_heads, d, -1).sum((1, 2))
             + o.pow(2).reshape(o.shape[0], unit.n_heads, d).sum((0, 2))).numpy()
    if unit.group_size == 1:  # every head has its own keys and values: the strongest overall
        heads = np.sort(np.argsort(-score, kind="stable")[:selection.heads.size])
        return HeadSelection(unit, heads, heads, None, float("nan"))
    per_group, heads = selection.heads.size // selection.kv_heads.size, []
    for g in selection.kv_heads:
        members = np.arange(g * unit.group_size, (g + 1) * unit.group_size)
        heads += sorted(members[np.argsort(-score[members], kind="stable")[:per_group]])
    return HeadSelection(unit, np.array(heads), selection.kv_heads, None, float("nan"))
