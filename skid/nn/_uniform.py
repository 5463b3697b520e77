"""``uniform=True``: one width for every repeated unit of a kind (every MLP, every attention
block, the stream), so a Hugging Face model stays homogeneous and its config can say it.

Units are repeated when they touch the same modules of different blocks: their qualified
names agree once the block index is taken out (``model.layers.3.mlp.up_proj`` →
``model.layers.*.mlp.up_proj``). A class of such units shares one width, chosen by the rule
that chooses a unit's width, applied to the class as a whole.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from .. import _policy
from . import _budget
from ._unit_kinds import unit_kind

__all__ = ["classes", "flops_candidates", "widths"]

_INDEX = re.compile(r"\.\d+(?=\.|$)")


def classes(units) -> list[int]:
    """Class number of every unit: units of one kind and width touching the same modules of
    different blocks share a number."""
    keys: dict = {}
    result = []
    for unit in units:
        pattern = tuple(_INDEX.sub(".*", name) for name in unit.modules())
        result.append(keys.setdefault((unit.kind, unit.width, pattern), len(keys)))
    return result


def widths(units, facs, *, rank=None, tol=None) -> np.ndarray:
    """One width per class from ``rank`` (the same fraction) or ``tol`` (the smallest width at
    which every member meets it)."""
    per_unit = []
    for unit, fac in zip(units, facs, strict=True):
        if rank is not None:
            k = unit_kind(unit).width_for_rank(unit, fac, rank)
        else:
            k = _policy.width_for_tol(fac.errors, tol)
        per_unit.append(int(k))
    number = classes(units)
    widest = {}
    for c, k in zip(number, per_unit, strict=True):
        widest[c] = max(widest.get(c, 0), k)
    return np.array([_valid(units[i], facs[i], widest[c]) for i, c in enumerate(number)],
                    dtype=np.int64)


@dataclass(frozen=True)
class _Class:
    """The units of one class as one unit of the FLOP model (every member's modules)."""

    members: tuple

    @property
    def width(self) -> int:
        return self.members[0].width

    def modules(self) -> tuple:
        return tuple(name for unit in self.members for name in unit.modules())

    def before(self, name: str) -> tuple:
        for unit in self.members:
            if name in unit.modules():
                return unit.before(name)
        return ()


def flops_candidates(units, facs, flops_info, target: float, concat_widths=None) -> list:
    """The ``target_flops`` candidates with one width per class: the budget's allocations over
    the classes, each class's error the root mean square of its members' errors."""
    module_flops, total = flops_info
    number = classes(units)
    n = max(number) + 1
    members = [[i for i, c in enumerate(number) if c == j] for j in range(n)]
    model = _budget.FlopsModel.from_units(
        [_Class(tuple(units[i] for i in m)) for m in members], module_flops, total,
        concat_widths)
    errors = [np.sqrt(np.mean([np.asarray(facs[i].errors) ** 2 for i in m], axis=0))
              for m in members]
    minimum = [unit_kind(units[m[0]]).smallest(facs[m[0]]) for m in members]
    return [np.array([_valid(units[i], facs[i], int(widths[c])) for i, c in enumerate(number)],
                     dtype=np.int64)
            for widths in _budget.flops_candidates(errors, model, target, minimum)]


def _valid(unit, fac, k: int) -> int:
    """A width the model's code runs (a head count: the same for every member of a class)."""
    return int(unit_kind(unit).runnable(fac, k))
