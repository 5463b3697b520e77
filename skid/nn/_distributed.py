"""Data-parallel calibration: every rank's statistics combined over a ``torch.distributed`` group.

Each rank streams its own shard of the calibration data; the statistics are sums over rows, so
summing them over the ranks (the Grams' upper triangles and the row counts; the TSQR factors are
gathered and refactored) gives every rank the statistics of all the data, and from there the
same widths, selections and compressed model. The batch that decisions are tried on (the graph
walk, the choice between ``target_flops`` allocations) is the first batch of the lowest rank
that has data, broadcast to all, so with shards cut in rank order the result equals one process
fitting on all the data.

The group is set for the duration of a fit with :func:`active`; the calibration calls
:func:`reduce_statistics` (and the rest of this module) at the few points where statistics are
final, which are no-ops without a group.
"""

from __future__ import annotations

import contextlib
import contextvars
import math

import torch
import torch.distributed as dist

from .._array import float_dtype_for
from .._linalg import GramAccumulator, QRAccumulator, triangle_size
from ._trace import map_tensors

__all__ = [
    "active",
    "agreed_key",
    "all_hit",
    "all_sum",
    "current",
    "first_batch",
    "reduce_statistics",
    "reduced_bytes",
    "resolve",
]

#: The type a ``process_group`` argument may have (a stand-in when torch lacks distributed).
ProcessGroup = dist.ProcessGroup if dist.is_available() else type("ProcessGroup", (), {})

_group = contextvars.ContextVar("skid_process_group", default=None)
_bytes = 0  # bytes of statistics this process has sent to all-reduce/all-gather


def resolve(process_group):
    """The group to combine statistics over, or None when there is nothing to combine.

    ``"auto"``: the default group when ``torch.distributed`` is initialised; ``None``: none; a
    ``ProcessGroup``: that one. A group of one rank is the same as none.
    """
    if process_group is None:
        return None
    initialized = dist.is_available() and dist.is_initialized()
    if isinstance(process_group, str):
        if process_group != "auto":
            raise ValueError(
                f"process_group must be 'auto', None or a ProcessGroup; got {process_group!r}."
            )
        if not initialized:
            return None
        process_group = dist.group.WORLD
    elif not initialized:
        raise ValueError(
            "A process_group was given but torch.distributed is not initialised; call "
            "torch.distributed.init_process_group(...) first (torchrun sets up the environment)."
        )
    return process_group if dist.get_world_size(process_group) > 1 else None


@contextlib.contextmanager
def active(group):
    """Within the block, the calibration combines its statistics over ``group`` (None: no)."""
    token = _group.set(group)
    try:
        yield group
    finally:
        _group.reset(token)


def current():
    """The group set by :func:`active`, or None."""
    return _group.get()


def rank_and_size() -> tuple[int, int]:
    """This process's rank in the active group and the group's size; ``(0, 1)`` without one."""
    group = current()
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def reduced_bytes() -> int:
    """Bytes of statistics this process has contributed to collectives so far."""
    return _bytes


def _comm_device(group) -> torch.device:
    """NCCL reduces CUDA tensors; every other backend (Gloo) host tensors."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_sum(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over the ranks of the active group (itself without a group).

    Returns a tensor on the communication device: ``tensor`` itself, reduced in place, when it
    already lives there (no second copy of a large statistic), else a reduced copy.
    """
    global _bytes
    group = current()
    if group is None:
        return tensor
    buffer = tensor.detach().to(_comm_device(group)).contiguous()
    _bytes += buffer.numel() * buffer.element_size()
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group)
    return buffer


def _max(values) -> list[int]:
    """Elementwise maximum of a list of ints over the ranks."""
    group = current()
    buffer = torch.tensor(values, dtype=torch.int64, device=_comm_device(group))
    dist.all_reduce(buffer, op=dist.ReduceOp.MAX, group=group)
    return buffer.tolist()


def reduce_statistics(accumulators, widths, n_samples: int) -> int:
    """Combine every accumulator over the ranks in place; returns the total sample count.

    Parameters
    ----------
    accumulators : list of GramAccumulator or QRAccumulator
        This rank's statistics (possibly empty: a rank without data still takes part).
    widths : list of int
        Columns of each statistic (the unit widths), for the ranks that saw no rows.
    n_samples : int
        Calibration samples seen by this rank.
    """
    if current() is None:
        return n_samples
    counts = [n_samples] + [acc.n_samples for acc in accumulators]
    counts = all_sum(torch.tensor(counts, dtype=torch.int64)).tolist()
    # every rank's statistic at the largest power-of-two scale any rank needed (exact)
    flags = _max([acc.scale_exp for acc in accumulators]
                 + [int(getattr(acc, "float32_products", False)) for acc in accumulators])
    exps, products = flags[:len(accumulators)], flags[len(accumulators):]
    for acc, width, rows, exp, f32 in zip(accumulators, widths, counts[1:], exps, products,
                                           strict=True):
        if isinstance(acc, GramAccumulator):
            _reduce_gram(acc, width, exp)
            acc.float32_products = bool(f32)
        elif isinstance(acc, QRAccumulator):
            _reduce_r(acc, width, exp)
        else:
            raise TypeError(f"Cannot combine a {type(acc).__name__} over ranks.")
        acc.n_samples = rows
    return counts[0]


def reduce_cross(acc, width: int, n_samples: int) -> int:
    """Combine a corrective :class:`skid._corrective.CrossAccumulator` over the ranks in place
    (Gram and cross statistic summed, or the TSQR factors of ``[Z_c | Z_o]`` stacked);
    returns the total sample count. An input counts as unchanged only if it is on every rank.
    """
    if current() is None:
        return n_samples
    (n_samples,) = all_sum(torch.tensor([n_samples], dtype=torch.int64)).tolist()
    acc.merge_over(width, all_sum=lambda a: all_sum(torch.as_tensor(a)), all_max=_max,
                   reduce_r=_reduce_r)
    return n_samples


def _reduce_gram(acc: GramAccumulator, width: int, exp: int) -> None:
    """The Gram's upper triangle (packed: width (width + 1) / 2 float64 entries, half of the
    m × m matrix) summed over the ranks."""
    packed = acc.triangle()
    if packed is None:  # a rank without rows adds zeros
        packed = torch.zeros(triangle_size(width), dtype=torch.float64)
    else:
        packed = torch.as_tensor(packed)  # a new array: scaled and reduced in place
        if acc.scale_exp != exp:  # the Gram is kept divided by 4**scale_exp
            packed.mul_(math.ldexp(1.0, 2 * (acc.scale_exp - exp)))
    acc.set_triangle(all_sum(packed), width, exp)


_DTYPE_CODES = {None: 0, "float32": 1, "float64": 2}


def _reduce_r(acc: QRAccumulator, width: int, exp: int) -> None:
    """All ranks' R factors (zero-padded to width × width) stacked and refactored."""
    global _bytes
    group = current()
    (code,) = _max([_DTYPE_CODES[acc.dtype]])  # a rank without rows learns the data's dtype
    dtype = next(name for name, c in _DTYPE_CODES.items() if c == code)
    device = _comm_device(group)
    padded = torch.zeros(width, width, dtype=torch.float64, device=device)
    if acc.R is not None:
        R = torch.as_tensor(acc.R).to(device, torch.float64)  # kept divided by 2**scale_exp
        padded[: R.shape[0]] = R * math.ldexp(1.0, acc.scale_exp - exp)
    parts = [torch.empty_like(padded) for _ in range(dist.get_world_size(group))]
    _bytes += padded.numel() * padded.element_size()
    dist.all_gather(parts, padded, group=group)
    stacked = torch.cat(parts).to(getattr(torch, dtype or "float64"))
    acc.R = torch.linalg.qr(stacked, mode="r")[1]
    acc.n_features, acc.dtype, acc.scale_exp = width, float_dtype_for(stacked), exp


def first_batch(batch):
    """The first batch of the lowest rank that has one, the same on every rank.

    Without a group, ``batch`` itself. Raises when no rank has any data.
    """
    group = current()
    if group is None:
        return batch
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    (top,) = _max([size - rank if batch is not None else 0])  # size - (lowest rank with data)
    if top == 0:
        raise ValueError("X is empty on every rank: no rank has a calibration batch.")
    owner = size - top
    payload = [map_tensors(batch, torch.Tensor.cpu) if rank == owner else None]
    dist.broadcast_object_list(payload, src=dist.get_global_rank(group, owner), group=group)
    return batch if rank == owner else payload[0]


def agreed_key(key: str) -> str:
    """A cache key made of every rank's key (each rank's data differ), the same on all ranks."""
    group = current()
    if group is None:
        return key
    keys = [None] * dist.get_world_size(group)
    dist.all_gather_object(keys, key, group=group)
    return "|".join(keys)


def all_hit(hit: bool) -> bool:
    """True when every rank found the statistics in its cache (they must all compute or none)."""
    if current() is None:
        return hit
    return _max([0 if hit else 1])[0] == 0
