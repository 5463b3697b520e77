"""Attention heads as prunable units: layouts, the head ID, and the surgery.

A self-attention block computes per head ``softmax(q_h k_hᵀ) v_h`` and concatenates the heads
into the input of its output projection ``o``. The ID applies to heads as to channels: the
statistic is the Gram of ``o``'s input (rows: tokens, columns: heads × head_dim), whole heads
are kept by a block-pivoted factorization (:class:`skid._linalg.BlockPivotedFactorization`),
and the least-squares ``T`` (kept heads' columns → all columns) is folded into ``o``. The query
rows of the dropped heads go (and the key/value rows, where a head has its own), and the
attributes the module's forward reads (head counts, ``num_key_value_groups``...) follow, so the
model's own code runs unchanged.

Grouped-query attention shares each key/value head among ``group_size`` query heads. Two
selections keep a grouping the code can run: the same number of query heads in every key/value
group (key/value heads all stay), or whole key/value groups with all their query heads. Both are
factorized (and, at one or two heads per group, the per-group greedy of
:mod:`skid.nn._head_greedy`); for every number of heads, the candidate judged best on the
held-out first calibration batch is used (:mod:`skid.nn._head_judge`), or, with one batch, the
one with the smallest error.

A layout (:class:`AttentionLayout`) says where a family keeps its projections and which
tensors follow its heads; the table of families is :mod:`skid.nn._attention_layouts`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .._linalg import BlockPivotedFactorization, small_step
from . import _budget
from ._attention_layouts import FORMS, AttentionLayout, attention_layout
from ._head_greedy import FixedHeads, groupwise_builders
from ._head_judge import judged_on_held_out
from ._parallel import map_for_width
from ._plan import Consumer
from ._surgery import fold_in, slice_out

__all__ = [
    "AttentionLayout",
    "HeadFactorization",
    "HeadSelection",
    "HeadUnit",
    "apply_head_selection",
    "attention_layout",
    "head_rows",
    "int_attribute",
    "per_head_target",
    "restore_form",
]

#: Attributes holding a head count or a heads-wide size, and how each follows a new count:
#: ``(n_heads, n_kv_heads, head_dim) -> value``. Set where a module has them as ints.
_HEAD_ATTRIBUTES = {
    "num_heads": lambda h, kv, d: h,
    "num_attention_heads": lambda h, kv, d: h,
    "n_heads": lambda h, kv, d: h,
    "num_key_value_heads": lambda h, kv, d: kv,
    "num_key_value_groups": lambda h, kv, d: h // kv,
    "all_head_size": lambda h, kv, d: h * d,
    "split_size": lambda h, kv, d: h * d,
    "inner_dim": lambda h, kv, d: h * d,
    "attn_dim": lambda h, kv, d: h * d,
}


@dataclass(frozen=True)
class HeadUnit:
    """The heads of one self-attention block.

    The statistic is the input of ``consumer`` (the output projection); ``width`` counts heads.
    """

    attention: str
    layout: AttentionLayout
    n_heads: int
    n_kv_heads: int
    kind: str = field(default="heads", init=False)
    positions: int = field(default=1, init=False)
    passthroughs: tuple = field(default=(), init=False)

    def name(self, relative: str) -> str:
        """The qualified name of a submodule of the block ("" is the block itself)."""
        if not relative or not self.attention:
            return relative or self.attention
        return f"{self.attention}.{relative}"

    @property
    def head_dim(self) -> int:
        return self.layout.head_dim

    @property
    def producer(self) -> str:
        return self.name(self.layout.queries)

    @property
    def consumer(self) -> str:
        return self.name(self.layout.output)

    @property
    def width(self) -> int:
        return self.n_heads

    @property
    def group_size(self) -> int:
        return self.n_heads // self.n_kv_heads

    # The channel-group view the calibration, the budget and the report read.
    n_readings = 1
    blocks = 1
    offsets = ()

    @property
    def producers(self) -> tuple:
        """The projections whose rows follow the kept heads (keys/values where each query
        head has its own)."""
        own_kv = () if self.group_size > 1 else (self.layout.keys, self.layout.values)
        return tuple(dict.fromkeys(self.name(n) for n in (self.layout.queries, *own_kv)))

    @property
    def consumers(self) -> tuple:
        return (Consumer(self.consumer),)

    def before(self, name: str) -> tuple:
        return ()

    def modules(self) -> tuple:
        """Modules whose FLOPs scale with the kept heads; the block's own name stands for its
        attention scores (what its FLOPs hold beyond its projections)."""
        return tuple(dict.fromkeys((*self.producers, self.consumer, self.attention)))


@dataclass(frozen=True)
class HeadSelection:
    """Kept query heads and key/value heads (ascending), and ``T`` for the output projection.

    ``interpolation`` has shape ``(len(heads) * head_dim, n_heads * head_dim)``, rows in the
    order of the kept columns; the output projection's input ``z`` becomes
    ``interpolation.T @ z[kept columns]``.
    """

    unit: HeadUnit
    heads: np.ndarray
    kv_heads: np.ndarray
    interpolation: np.ndarray
    error: float
    intercept: np.ndarray | None = None  # fit_intercept: the constant b of the input
    interpolations = None  # one fold, into the output projection

    @property
    def keep(self) -> torch.Tensor:
        return torch.as_tensor(self.heads)


# ------------------------------------------------------------------------------ layouts


def restore_form(module, layout):
    """Give a block its own class back (the pruning form a finder gave it), if it has one."""
    if layout.form:
        FORMS[layout.form][1](module)


def per_head_target(block, spec):
    """The module, or the tensor, that ``spec`` names in ``block``."""
    owner, _, leaf = spec.name.rpartition(".")
    return getattr(block.get_submodule(owner), leaf)


def int_attribute(module, name):
    """``module.<name>`` where it is an int (a head count or size), else None."""
    value = getattr(module, name, None)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


# ------------------------------------------------------------------------------ selection


class HeadFactorization:
    """Head IDs of one block for every number of kept heads, from the output projection's Gram.

    For grouped-query attention both groupings are factorized (equal query heads per key/value
    group, in rounds; or whole key/value groups); ``errors[k]`` is the smaller exact error
    among the selections of at most ``k`` heads that the model can run, so it is nonincreasing
    and the smallest ``k`` meeting a tolerance is always a valid count.

    Where several candidates give one count, the smallest exact error picks one; with
    ``held_out``, the candidates built without the first calibration batch are judged on it
    instead (:mod:`skid.nn._head_judge`), and the winner is built on all rows.

    Parameters
    ----------
    gram : ndarray of shape (n_heads * head_dim, n_heads * head_dim)
    unit : HeadUnit
    weight_gram : ndarray, optional
        ``WᵀW`` of the output projection: heads are then kept for its outputs (errors are
        relative output errors; ``T`` stays the least-squares fit).
    held_out : skid.nn._head_judge.HeldOutGrams, optional
        ``gram`` split into the first batch's Gram and the rest's.
    """

    def __init__(self, gram, unit: HeadUnit, weight_gram=None, held_out=None):
        self.unit, self.gram, self.held_out = unit, gram, held_out
        H = unit.n_heads
        # hundreds of products and solves of small blocks: on BLAS's own thread count each
        # woke its other threads (up to 18× the time, torch on one thread, BLAS on two)
        with small_step(len(gram)):
            self._candidates(weight_gram)
        errors = np.ones(H + 1)
        for k in range(1, H + 1):
            valid = [j for j in self._best if j <= k]
            errors[k] = min(self._error(j) for j in valid) if valid else 1.0
        errors[H] = 0.0
        self.errors = errors
        self.n_features = H

    def _candidates(self, weight_gram) -> None:
        """Each mode's factorization that a count's choice reads (``_modes``) and the best
        ``(mode, blocks)`` of each valid head count (``_best``), judged on the held-out rows
        where modes compete.

        Where they compete, every mode is built first without the held-out rows (which also
        says what counts each offers), and on all rows only the modes that offer a count the
        judge left open: the candidates it decides are never read on all rows."""
        gram, unit, held_out, H = self.gram, self.unit, self.held_out, self.unit.n_heads
        judging = held_out is not None and len(_mode_builders(unit, weight_gram)) > 1
        built = _modes(held_out.rest if judging else gram, unit, weight_gram)
        candidates = {}  # valid head count -> [(mode, number of blocks)], in the modes' order
        for mode, fac in built.items():
            for blocks in range(1, fac.n_blocks + 1):
                k = self._heads_of(mode, blocks)
                # not mid-round (the groups would keep unequal counts), not a count the mode
                # has no candidate for (infinite error)
                if k > 0 and np.isfinite(fac.errors[blocks]):
                    candidates.setdefault(k, []).append((mode, blocks))
        # every candidate of all H heads keeps them all (T the identity, whichever mode)
        below = {k: o for k, o in candidates.items() if k < H}
        contested = {k: o for k, o in below.items() if len(o) > 1}
        winners = judged_on_held_out(contested, built, held_out) if judging and contested else {}
        left = {k: o for k, o in below.items() if k not in winners}
        self._modes = (_modes(gram, unit, weight_gram, {m for o in left.values() for m, _ in o})
                       if judging else built)
        self._best = {k: min(options, key=lambda o: self._modes[o[0]].errors[o[1]])
                      for k, options in left.items()}  # the first on a tie
        if H in candidates:
            self._modes["all"] = AllHeads(H, len(gram))
            self._best[H] = ("all", H)
        if winners:
            judged = FixedHeads(gram, _head_columns(unit), weight_gram)
            judged.add(*(np.unique(columns // unit.head_dim) for columns in winners.values()))
            self._best.update({k: ("judged", k) for k in winners})
            self._modes["judged"] = judged

    def for_outputs(self, weight_gram) -> HeadFactorization:
        """The same statistic, heads kept for the output projection's outputs."""
        return HeadFactorization(self.gram, self.unit, weight_gram, self.held_out)

    def _heads_of(self, mode, blocks) -> int:
        if mode == "judged":  # held-out winners, by their count of heads
            return blocks
        if mode.startswith("per_group"):  # rounds, or per-group candidates: equal per group
            return blocks if blocks % self.unit.n_kv_heads == 0 else -1
        return blocks * (self.unit.group_size if mode == "groups" else 1)

    def _error(self, k) -> float:
        mode, blocks = self._best[k]
        return float(self._modes[mode].errors[blocks])

    @property
    def valid_counts(self) -> list:
        """Head counts the model's code can run with, ascending."""
        return sorted(self._best)

    def valid(self, k: int) -> int:
        """The largest valid count with the same error as ``k`` heads (at least the smallest)."""
        counts = self.valid_counts
        below = [j for j in counts if j <= k and self._error(j) <= self.errors[k]]
        return max(below) if below else counts[0]

    def width_for_rank(self, rank: float) -> int:
        """Heads kept for a fraction ``rank``: the fraction of each key/value group's heads,
        rounded as channel fractions are, so every group keeps the same number."""
        if self.unit.group_size == 1:  # each head its own key/value: a fraction of all
            return int(_budget.widths_for_rank([self.unit.n_heads], rank)[0])
        per_group = int(_budget.widths_for_rank([self.unit.group_size], rank)[0])
        return per_group * self.unit.n_kv_heads

    def select(self, k: int) -> HeadSelection:
        """The selection of ``valid(k)`` heads."""
        k = self.valid(int(k))
        mode, blocks = self._best[k]
        with small_step(len(self.gram)):
            kept, columns, T = self._modes[mode].select(blocks)
        order = np.argsort(columns, kind="stable")
        columns, T = columns[order], T[order]
        d, size = self.unit.head_dim, self.unit.group_size
        heads = np.unique(columns // d)
        kv_heads = np.unique(heads // size)
        return HeadSelection(self.unit, heads, kv_heads, T, self._error(k))


def _head_columns(unit) -> list:
    """The columns of each head in the output projection's input."""
    d = unit.head_dim
    return [np.arange(h * d, (h + 1) * d) for h in range(unit.n_heads)]


def _mode_builders(unit, weight_gram) -> dict:
    """``{mode: function of a Gram building its factorization}``: the selections the model
    can run."""
    H, size = unit.n_heads, unit.group_size
    heads = _head_columns(unit)
    build = functools.partial(BlockPivotedFactorization, weight_gram=weight_gram)
    if size == 1 or unit.n_kv_heads == 1:
        return {"heads": lambda gram: build(gram, heads, None)}
    labels = np.arange(H) // size
    groups = [np.concatenate(heads[g * size:(g + 1) * size]) for g in range(unit.n_kv_heads)]
    builders = {"per_group": lambda gram: build(gram, heads, labels),
                "groups": lambda gram: build(gram, groups, None)}
    return builders | groupwise_builders(heads, labels, weight_gram)


def _modes(gram, unit, weight_gram, wanted=None) -> dict:
    """``{mode: factorization}`` of the selections the model can run, from one Gram (only the
    modes named in ``wanted``, if given); built side by side for a wide Gram."""
    builders = {mode: build for mode, build in _mode_builders(unit, weight_gram).items()
                if wanted is None or mode in wanted}
    built = map_for_width(lambda build: build(gram), builders.values(), len(gram))
    return dict(zip(builders, built, strict=True))


class AllHeads:
    """The selection of every head, whichever mode offers it: ``T`` the identity, the error 0
    (what :meth:`BlockPivotedFactorization.select` gives keeping every block, in head order)."""

    def __init__(self, n_heads: int, width: int):
        self.n_blocks, self.width = n_heads, width
        self.errors = np.full(n_heads + 1, np.inf)
        self.errors[n_heads] = 0.0

    def select(self, blocks: int):
        if blocks != self.n_blocks:
            raise ValueError(f"Only all {self.n_blocks} heads; got {blocks}.")
        return np.arange(self.n_blocks), np.arange(self.width), np.eye(self.width)


class CorrectiveHeadFactorization(HeadFactorization):
    """Heads for ``calibration="corrective"``: kept by the head ID of the compressed model's
    output-projection input ``Z_c``, with ``T`` the least-squares fit of the original model's
    ``Z_o`` from the kept heads' columns; ``errors[k]`` is ``‖Z_o − Z_c[:, K] T‖_F / ‖Z_o‖_F``.

    Parameters
    ----------
    stats : skid._corrective.CrossStatistics
        Of the output projection's input.
    unit : HeadUnit
    weight_gram : ndarray, optional
        ``WᵀW`` of the output projection (``objective="outputs"``): heads are then kept for
        its outputs and the errors weigh each channel by its column's squared norm.
    """

    def __init__(self, stats, unit: HeadUnit, weight_gram=None):
        first = np.asarray(stats.first, dtype=np.float64)
        super().__init__(first if stats.method == "gram" else first.T @ first, unit,
                         weight_gram)
        self.stats = stats
        self._weights = None if weight_gram is None else np.diag(weight_gram).copy()
        with small_step(len(first)):
            self._fits = {k: self._fit(k) for k in self.valid_counts}
        errors = np.ones(self.unit.n_heads + 1)
        for k in range(1, self.unit.n_heads + 1):
            valid = [j for j in self._fits if j <= k]
            errors[k] = min(self._fits[j].error for j in valid) if valid else 1.0
        self.errors = errors

    def _fit(self, k) -> HeadSelection:
        selection = super().select(k)
        d = self.unit.head_dim
        columns = (selection.heads[:, None] * d + np.arange(d)).ravel()
        keep, T, error = self.stats.fit(columns, self._weights)
        order = np.argsort(keep, kind="stable")  # rows in the order of the kept columns
        return HeadSelection(self.unit, selection.heads, selection.kv_heads, T[order],
                             float(error))

    def _error(self, k) -> float:
        fits = self.__dict__.get("_fits")
        return super()._error(k) if fits is None else fits[k].error

    def select(self, k: int) -> HeadSelection:
        return self._fits[self.valid(int(k))]


# ------------------------------------------------------------------------------ surgery


def apply_head_selection(model: nn.Module, selection: HeadSelection) -> nn.Module:
    """Apply one block's head selection to ``model`` in place (modules looked up by name)."""
    unit, heads, kv_heads = selection.unit, selection.heads, selection.kv_heads
    layout, d = unit.layout, unit.head_dim
    if heads.size == 0 or heads.size % kv_heads.size:
        raise ValueError(f"{heads.size} query heads cannot share {kv_heads.size} key/value heads")
    block = model.get_submodule(unit.attention)
    if heads.size == unit.n_heads:  # T is the identity: nothing to cut; the original class
        fold_in(model.get_submodule(unit.consumer), selection.interpolation)
        restore_form(block, layout)
        return model
    if layout.form:  # a copy that find_heads did not see (a baseline's) takes the form here
        FORMS[layout.form][0](block)
    rows = head_rows(heads, d)
    q = model.get_submodule(unit.name(layout.queries))
    if layout.fused:
        width = unit.n_heads * d
        slice_out(q, np.concatenate([rows, width + rows, 2 * width + rows]))
    else:
        slice_out(q, rows)
        if kv_heads.size < unit.n_kv_heads:
            for name in (layout.keys, layout.values):
                slice_out(model.get_submodule(unit.name(name)), head_rows(kv_heads, d))
    fold_in(model.get_submodule(unit.consumer), selection.interpolation)
    for spec in layout.per_head:
        _slice_per_head(block, spec, rows if spec.rows else np.asarray(heads))
    holder = model.get_submodule(unit.name(layout.holder))
    n_kv = heads.size if unit.group_size == 1 else kv_heads.size
    for attribute, value in _HEAD_ATTRIBUTES.items():
        if int_attribute(holder, attribute) is not None:
            setattr(holder, attribute, value(heads.size, n_kv, d))
    return model


def _slice_per_head(block, spec, keep) -> None:
    """Keep the entries ``keep`` of a per-head tensor (a new tensor: never written into)."""
    target = per_head_target(block, spec)
    if isinstance(target, nn.Module):
        slice_out(target, keep)
        return
    owner, _, leaf = spec.name.rpartition(".")
    owner = block.get_submodule(owner)
    index = torch.as_tensor(keep, device=target.device)
    kept = target.detach().index_select(spec.axis, index).clone()
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(kept, requires_grad=target.requires_grad)
    else:
        owner._buffers[leaf] = kept


def head_rows(heads, head_dim) -> np.ndarray:
    """The rows (or columns) of ``heads``' entries in a heads × head_dim axis, head by head."""
    return (np.asarray(heads)[:, None] * head_dim + np.arange(head_dim)).reshape(-1)
