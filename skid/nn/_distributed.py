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
import datetime
import hashlib
import math
import os
import re

import torch
import torch.distributed as dist

from .._array import float_dtype_for
from .._linalg import GramAccumulator, QRAccumulator, triangle_size
from ._trace import map_tensors

__all__ = [
    "any_rank",
    "owns_first_batch",
    "active",
    "agreed_key",
    "all_hit",
    "all_sum",
    "check_agreement",
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

#: How long a rank waits in a collective for the others before it raises (seconds; the
#: environment variable ``SKID_COLLECTIVE_TIMEOUT`` overrides it).
TIMEOUT_S = 1800.0

#: Settings each rank may set for itself (its own device, cache folder, output).
PER_RANK_SETTINGS = ("model", "memory", "verbose", "device", "process_group")


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


def _timeout() -> datetime.timedelta:
    return datetime.timedelta(seconds=float(os.environ.get("SKID_COLLECTIVE_TIMEOUT",
                                                           TIMEOUT_S)))


def _wait(work, what: str) -> None:
    """Wait for an asynchronous collective, at most :data:`TIMEOUT_S`, with a message."""
    timeout = _timeout()
    try:
        done = work.wait(timeout)
    except RuntimeError as exc:
        if "timed out" not in str(exc).lower() and "timeout" not in str(exc).lower():
            raise
        done = False
    if done is False:
        rank, size = rank_and_size()
        raise TimeoutError(
            f"rank {rank} of {size} waited {timeout.total_seconds():.0f} s for the other ranks "
            f"in {what}: a rank stopped, or runs other data or code (a different model, "
            "settings or skid version). Every rank must call fit with the same model and "
            "settings; SKID_COLLECTIVE_TIMEOUT sets the wait in seconds."
        )


def _all_reduce(buffer, op, what: str):
    _wait(dist.all_reduce(buffer, op=op, group=current(), async_op=True), what)
    return buffer


def _all_gather(buffer, what: str) -> list:
    group = current()
    parts = [torch.empty_like(buffer) for _ in range(dist.get_world_size(group))]
    _wait(dist.all_gather(parts, buffer, group=group, async_op=True), what)
    return parts


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
    return _all_reduce(buffer, dist.ReduceOp.SUM, "the sum of the calibration statistics")


def _max(values, what="an agreement on the calibration's next step") -> list[int]:
    """Elementwise maximum of a list of ints over the ranks."""
    group = current()
    buffer = torch.tensor(values, dtype=torch.int64, device=_comm_device(group))
    return _all_reduce(buffer, dist.ReduceOp.MAX, what).tolist()


# ------------------------------------------------------------------------------- agreement


def check_agreement(model, settings: dict) -> None:
    """Raise the same ValueError on every rank unless all ranks hold the same model
    (architecture: module names and classes, tensor names, shapes, dtypes; weights: a checksum
    of their bits) and the same settings (all but :data:`PER_RANK_SETTINGS`).

    Called before any statistic is reduced: ranks given different models would otherwise
    reduce tensors of other sizes (Gloo aborts the process) or silently end with different
    models.
    """
    if current() is None:
        return
    mine = torch.tensor([_architecture_hash(model), _weights_checksum(model),
                         _settings_hash(settings)], dtype=torch.int64)
    parts = _all_gather(mine.to(_comm_device(current())), "the check that all ranks were "
                        "given the same model and settings")
    parts = [p.cpu() for p in parts]
    for i, what in enumerate(("architecture", "weights", "settings")):
        differ = [r for r, p in enumerate(parts) if p[i] != parts[0][i]]
        if differ:
            detail = {"architecture": "module structure, tensor shapes or dtypes",
                      "weights": "parameter or buffer values",
                      "settings": "compressor parameters"}[what]
            raise ValueError(
                f"The ranks of the process group were given models or settings that differ "
                f"in their {what} ({detail}): rank(s) {differ} differ from rank 0. Every rank "
                "must fit the same model (same weights: load or broadcast them before fit) with "
                "the same settings, each on its own shard of X."
            )


def _digest(text: str) -> int:
    """A signed 64-bit hash of ``text``."""
    raw = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(raw, "little", signed=True)


def _architecture_hash(model) -> int:
    lines = [f"{n}:{type(m).__module__}.{type(m).__qualname__}" for n, m in model.named_modules()]
    lines += [f"{n}:{tuple(t.shape)}:{t.dtype}" for n, t in model.state_dict().items()]
    return _digest("\n".join(lines))


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_CHUNK = 1 << 22


def _weights_checksum(model) -> int:
    """A checksum of every tensor's bits, computed where the tensor lives (a sum and a
    position-weighted sum of the bit patterns, wrapping in 64 bits: the same on every device)."""
    total = 0
    for index, tensor in enumerate(model.state_dict().values()):
        flat = tensor.detach().reshape(-1)
        if flat.is_complex():
            flat = torch.view_as_real(flat).reshape(-1)
        if flat.dtype == torch.bool:
            flat = flat.to(torch.uint8)
        bits = flat.view(_INT_OF_SIZE[flat.element_size()])
        plain = weighted = 0
        for start in range(0, bits.numel(), _CHUNK):
            chunk = bits[start : start + _CHUNK].to(torch.int64)
            position = torch.arange(start, start + chunk.numel(), device=chunk.device) % 65521
            plain += int(chunk.sum())
            weighted += int((chunk * (position + 1)).sum())
        total = (total * 1000003 + plain * 31 + weighted + index) % (1 << 61)
    return total


def _settings_hash(settings: dict) -> int:
    def stable(value):
        if callable(value) and hasattr(value, "__qualname__"):
            return f"{getattr(value, '__module__', '')}.{value.__qualname__}"
        return re.sub(r"0x[0-9a-fA-F]+", "", repr(value))  # addresses differ by process

    shared = {k: stable(v) for k, v in sorted(settings.items()) if k not in PER_RANK_SETTINGS}
    return _digest(repr(shared))


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
    _bytes += padded.numel() * padded.element_size()
    parts = _all_gather(padded, "the stacking of the calibration statistics (TSQR factors)")
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
    # size - (lowest rank with data)
    (top,) = _max([size - rank if batch is not None else 0], "the choice of the first batch")
    if top == 0:
        raise ValueError("X is empty on every rank: no rank has a calibration batch.")
    owner = size - top
    payload = [map_tensors(batch, torch.Tensor.cpu) if rank == owner else None]
    dist.broadcast_object_list(payload, src=dist.get_global_rank(group, owner), group=group)
    return batch if rank == owner else payload[0]


def owns_first_batch(has_data: bool) -> bool:
    """Whether this rank's first batch is the one :func:`first_batch` hands every rank (the
    lowest rank with data); True without a group."""
    group = current()
    if group is None:
        return has_data
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    (top,) = _max([size - rank if has_data else 0], "the choice of the first batch")
    return top != 0 and size - top == rank


def any_rank(*flags: bool) -> list[bool]:
    """Each flag or-ed over the ranks (the flags themselves without a group)."""
    if current() is None:
        return [bool(f) for f in flags]
    return [bool(v) for v in _max([int(bool(f)) for f in flags], "an agreement on the split")]


def agreed_key(key: str) -> str:
    """A cache key made of every rank's key (each rank's data differ), the same on all ranks."""
    group = current()
    if group is None:
        return key
    raw = key.encode()
    (length,) = _max([len(raw)], "the agreement on the cache keys")
    buffer = torch.zeros(length, dtype=torch.uint8)
    buffer[: len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    parts = _all_gather(buffer.to(_comm_device(group)), "the agreement on the cache keys")
    return "|".join(bytes(p.cpu().tolist()).rstrip(b"\0").decode() for p in parts)


def all_hit(hit: bool) -> bool:
    """True when every rank found the statistics in its cache (they must all compute or none)."""
    if current() is None:
        return hit
    return _max([0 if hit else 1], "the agreement on what the cache holds")[0] == 0
