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
factorized and, for every number of heads, the one with the smaller error is used.

A layout (:class:`AttentionLayout`) says where a family keeps its projections; the recognisers
in ``_LAYOUTS`` cover HF LLaMA/Qwen2/Mistral/Gemma/ViT (``q/k/v/o_proj``), BERT/RoBERTa
(``self.query/key/value`` + ``output.dense``) and GPT-2 (fused ``c_attn``); torch's fused
``nn.MultiheadAttention`` and T5 (relative position bias shared across layers) are skipped with
their reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .._linalg import BlockPivotedFactorization
from . import _budget
from ._head_greedy import groupwise_candidates
from ._plan import Consumer, Skipped
from ._surgery import fold_in, slice_out, surgery_for

__all__ = [
    "AttentionLayout",
    "HeadFactorization",
    "HeadSelection",
    "HeadUnit",
    "apply_head_selection",
    "attention_layout",
    "find_heads",
    "in_forward_order",
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
}


@dataclass(frozen=True)
class AttentionLayout:
    """Where an attention family keeps its projections (names relative to the block).

    ``fused``: queries, keys and values are the three equal thirds of one module's output
    (GPT-2's ``c_attn``); ``holder`` is the submodule whose attributes hold the head counts.
    """

    queries: str
    keys: str
    values: str
    output: str
    head_dim: int
    holder: str = ""
    fused: bool = False


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
        return f"{self.attention}.{relative}" if self.attention else relative

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
        return (*self.producers, self.consumer, self.attention)


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


def _int_attr(module, name):
    value = getattr(module, name, None)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _linear_children(module, *names):
    children = [getattr(module, n, None) for n in names]
    return all(isinstance(c, nn.Linear) for c in children)


def _projections_layout(module):
    """``q_proj/k_proj/v_proj/o_proj`` and ``head_dim`` (HF LLaMA, Qwen2, Mistral, ViT...)."""
    head_dim = _int_attr(module, "head_dim")
    if head_dim and _linear_children(module, "q_proj", "k_proj", "v_proj", "o_proj"):
        return AttentionLayout("q_proj", "k_proj", "v_proj", "o_proj", head_dim)
    return None


def _bert_layout(module):
    """``self.query/key/value`` with ``attention_head_size`` and ``output.dense`` (HF BERT)."""
    inner, output = getattr(module, "self", None), getattr(module, "output", None)
    if inner is None or output is None or not _linear_children(output, "dense"):
        return None
    head_dim = _int_attr(inner, "attention_head_size")
    if head_dim and _linear_children(inner, "query", "key", "value"):
        return AttentionLayout("self.query", "self.key", "self.value", "output.dense",
                               head_dim, holder="self")
    return None


def _gpt2_layout(module):
    """GPT-2: q, k, v fused in ``c_attn`` (HF ``Conv1D``), output ``c_proj``."""
    c_attn, c_proj = getattr(module, "c_attn", None), getattr(module, "c_proj", None)
    if type(c_attn).__name__ != "Conv1D" or type(c_proj).__name__ != "Conv1D":
        return None
    if getattr(module, "is_cross_attention", False):
        return "cross-attention (keys and values from another sequence) is not supported yet"
    head_dim = _int_attr(module, "head_dim")
    if head_dim and _int_attr(module, "split_size"):
        return AttentionLayout("c_attn", "c_attn", "c_attn", "c_proj", head_dim, fused=True)
    return None


def _unsupported(module):
    if isinstance(module, nn.MultiheadAttention):
        return ("torch's fused nn.MultiheadAttention requires heads × head_dim == embed_dim, "
                "so its heads cannot be pruned in place")
    if hasattr(module, "relative_attention_bias") or hasattr(
        module, "has_relative_attention_bias"
    ):
        return ("a relative position bias computed once and shared by later layers (T5) "
                "fixes the head count; not supported yet")
    return None


_LAYOUTS = (_unsupported, _projections_layout, _bert_layout, _gpt2_layout)


def attention_layout(module: nn.Module):
    """The module's :class:`AttentionLayout`, a reason string if it is an unsupported attention,
    or None when it is not an attention block."""
    for recognise in _LAYOUTS:
        found = recognise(module)
        if found is not None:
            return found
    return None


# ------------------------------------------------------------------------------ discovery


def find_heads(model: nn.Module, example_args, example_kwargs=None, *, exclude=()):
    """Self-attention blocks whose heads can be pruned, and the attention blocks left alone.

    A block counts only if the forward pass on the example calls its output projection.

    Returns
    -------
    units : list of HeadUnit, in forward order
    skipped : list of Skipped
    """
    modules = dict(model.named_modules())
    found, skipped = [], []
    for name, module in modules.items():
        layout = attention_layout(module)
        if layout is None:
            continue
        if isinstance(layout, str):
            skipped.append(Skipped(name, f"attention heads: {layout}"))
            continue
        if any(name == e or name.startswith(e + ".") for e in exclude if e):
            skipped.append(Skipped(name, "attention heads: excluded"))
            continue
        unit, reason = _head_unit(model, name, layout)
        if unit is None:
            skipped.append(Skipped(name, f"attention heads: {reason}"))
        else:
            found.append(unit)
    order = _call_order(model, [u.consumer for u in found], example_args, example_kwargs or {})
    units = []
    for unit in found:
        if unit.consumer in order:
            units.append(unit)
        else:
            skipped.append(Skipped(unit.attention, "attention heads: never called on the data"))
    units.sort(key=lambda u: order[u.consumer])
    return units, skipped


def _head_unit(model, name, layout):
    """The unit of one block with ``layout``, or ``(None, reason)``."""
    unit = HeadUnit(name, layout, 1, 1)
    q = model.get_submodule(unit.name(layout.queries))
    k = model.get_submodule(unit.name(layout.keys))
    o = model.get_submodule(unit.consumer)
    d = layout.head_dim
    q_width = _out_width(q) // 3 if layout.fused else _out_width(q)
    kv_width = q_width if layout.fused else _out_width(k)
    if q_width % d or kv_width % d or _in_width(o) != q_width:
        return None, (f"projection widths ({q_width} queries, {kv_width} keys, output input "
                      f"{_in_width(o)}) are not whole heads of {d}")
    n_heads, n_kv = q_width // d, kv_width // d
    if n_heads % n_kv:
        return None, f"{n_heads} query heads do not split evenly over {n_kv} key/value heads"
    holder = model.get_submodule(unit.name(layout.holder) if layout.holder else name)
    groups = _int_attr(holder, "num_key_value_groups")
    if groups is not None and groups != n_heads // n_kv:
        return None, f"num_key_value_groups={groups} does not match {n_heads}/{n_kv} heads"
    if n_heads < 2:
        return None, "a single head"
    return HeadUnit(name, layout, n_heads, n_kv), None


def _out_width(module) -> int:
    """Output channels, as the layer kind's registry entry reads them (Linear, HF Conv1D)."""
    return int(surgery_for(module).out_width(module))


def _in_width(module) -> int:
    return int(surgery_for(module).in_width(module))


def in_forward_order(model, units, args, kwargs) -> list:
    """Channel groups and head units together, by the first call of their first producer
    (a stable sort: units with one producer keep their order)."""
    order = _call_order(model, list(dict.fromkeys(u.producer for u in units)), args, kwargs)
    return sorted(units, key=lambda u: order.get(u.producer, len(order)))


def _call_order(model, names, args, kwargs) -> dict:
    """Position of each named module's first call in one forward pass."""
    order, handles = {}, []
    for name in names:
        def hook(module, inputs, name=name):
            order.setdefault(name, len(order))
        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return order


# ------------------------------------------------------------------------------ selection


class HeadFactorization:
    """Head IDs of one block for every number of kept heads, from the output projection's Gram.

    For grouped-query attention both groupings are factorized (equal query heads per key/value
    group, in rounds; or whole key/value groups); ``errors[k]`` is the smaller exact error
    among the selections of at most ``k`` heads that the model can run, so it is nonincreasing
    and the smallest ``k`` meeting a tolerance is always a valid count.

    Parameters
    ----------
    gram : ndarray of shape (n_heads * head_dim, n_heads * head_dim)
    unit : HeadUnit
    weight_gram : ndarray, optional
        ``WᵀW`` of the output projection: heads are then kept for its outputs (errors are
        relative output errors; ``T`` stays the least-squares fit).
    """

    def __init__(self, gram, unit: HeadUnit, weight_gram=None):
        self.unit, self.gram = unit, gram
        H, d, size = unit.n_heads, unit.head_dim, unit.group_size
        heads = [np.arange(h * d, (h + 1) * d) for h in range(H)]
        self._modes = {}
        if size == 1 or unit.n_kv_heads == 1:
            self._modes["heads"] = BlockPivotedFactorization(gram, heads, None, weight_gram)
        else:
            labels = np.arange(H) // size
            self._modes["per_group"] = BlockPivotedFactorization(gram, heads, labels, weight_gram)
            groups = [np.concatenate(heads[g * size:(g + 1) * size])
                      for g in range(unit.n_kv_heads)]
            self._modes["groups"] = BlockPivotedFactorization(gram, groups, None, weight_gram)
            self._modes.update(groupwise_candidates(gram, heads, labels, weight_gram))
        self._best = {}  # valid head count -> (mode, number of blocks)
        for mode, fac in self._modes.items():
            for blocks in range(1, fac.n_blocks + 1):
                k = self._heads_of(mode, blocks)
                if k <= 0:
                    continue  # mid-round: the groups would keep unequal counts
                if k in self._best:
                    old_mode, old_blocks = self._best[k]
                    if self._modes[old_mode].errors[old_blocks] <= fac.errors[blocks]:
                        continue
                self._best[k] = (mode, blocks)
        errors = np.ones(H + 1)
        for k in range(1, H + 1):
            valid = [j for j in self._best if j <= k]
            errors[k] = min(self._error(j) for j in valid) if valid else 1.0
        errors[H] = 0.0
        self.errors = errors
        self.n_features = H

    def for_outputs(self, weight_gram) -> HeadFactorization:
        """The same statistic, heads kept for the output projection's outputs."""
        return HeadFactorization(self.gram, self.unit, weight_gram)

    def _heads_of(self, mode, blocks) -> int:
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
        kept, columns, T = self._modes[mode].select(blocks)
        order = np.argsort(columns, kind="stable")
        columns, T = columns[order], T[order]
        d, size = self.unit.head_dim, self.unit.group_size
        heads = np.unique(columns // d)
        kv_heads = np.unique(heads // size)
        return HeadSelection(self.unit, heads, kv_heads, T, self._error(k))


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
    rows = _rows(heads, d)
    q = model.get_submodule(unit.name(layout.queries))
    if layout.fused:
        width = unit.n_heads * d
        slice_out(q, np.concatenate([rows, width + rows, 2 * width + rows]))
    else:
        slice_out(q, rows)
        if kv_heads.size < unit.n_kv_heads:
            for name in (layout.keys, layout.values):
                slice_out(model.get_submodule(unit.name(name)), _rows(kv_heads, d))
    fold_in(model.get_submodule(unit.consumer), selection.interpolation)
    holder = model.get_submodule(unit.name(layout.holder) if layout.holder else unit.attention)
    n_kv = heads.size if unit.group_size == 1 else kv_heads.size
    for attribute, value in _HEAD_ATTRIBUTES.items():
        if _int_attr(holder, attribute) is not None:
            setattr(holder, attribute, value(heads.size, n_kv, d))
    return model


def _rows(heads, head_dim) -> np.ndarray:
    return (np.asarray(heads)[:, None] * head_dim + np.arange(head_dim)).reshape(-1)
