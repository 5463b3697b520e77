"""Calibration: stream batches through a model and accumulate every unit's ID statistics.

One forward pass per batch, with a forward pre-hook on one consumer per distinct tensor that a
group's consumers read (one *reading*): the consumer's input, viewed as (rows, channels) by
:func:`skid.nn._surgery.as_samples`, goes into that reading's streaming accumulator (``XᵀX``
or a TSQR factor, on the model's device). Memory depends on the widths, never on the amount of
calibration data. The factorizations that come out are small host NumPy objects, which
:class:`StatisticsCache` stores with ``joblib.Memory`` under a key made of the model's weights
and executed ops, the data and the settings — never of object identities.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import os

import joblib
import numpy as np
import torch
from torch import nn

from .. import _array
from .._corrective import CrossAccumulator
from .._linalg import GramAccumulator, NonFiniteDataError, QRAccumulator
from . import _distributed, _intercept
from ._batches import (
    StopForward,
    batch_size_of,
    hash_value,
    model_device_dtype,
    run_model,
    to_inputs,
)
from ._fingerprint import describe_execution
from ._head_judge import HeldOutGrams
from ._joint import BlockFactorization, JointFactorization
from ._parallel import map_units
from ._surgery import as_samples, offset_of
from ._trace import module_kind
from ._unit_kinds import consumer_weight_gram, unit_kind

__all__ = [
    "StatisticsCache",
    "calibration_passes",
    "count_calibration_pass",
    "corrective_statistics",
    "model_fingerprint",
    "statistic_width",
    "unit_statistics",
]

_passes = 0  # calibration forward passes (one per batch) run in this process


def calibration_passes() -> int:
    """Number of calibration forward passes (batches through a hooked model) so far."""
    return _passes


def count_calibration_pass() -> None:
    """Count one more calibration pass run outside this module (a stream rotation's)."""
    global _passes
    _passes += 1


# ------------------------------------------------------------------------------ statistics


class _NonFiniteActivations(BaseException):
    """Raised by a hook whose rows hold NaN/Inf; a BaseException so that ``run_model`` (and
    the model's own ``except Exception``) lets it through, to be raised as a ValueError."""


def unit_statistics(model, units, batches, *, method="gram", precision="float64", verbose=False):
    """One streamed pass over ``batches``; a factorization per unit and the number of samples.

    Parameters
    ----------
    model : nn.Module
        In eval mode, on the device where calibration runs; not modified (hooks are removed).
    units : list of ChannelGroup
    batches : Batches
    method : {"gram", "qr"}
        ``XᵀX`` + pivoted Cholesky (one GEMM per batch), or TSQR (accurate to rounding).
    precision : {"float64", "native"}
        Products of the Gram route (see :class:`skid._linalg.GramAccumulator`).
    verbose : bool
        Show a tqdm progress bar over the batches.

    Returns
    -------
    factorizations : list, one per group
        A ``PivotedFactorization`` when every consumer reads the same tensor, a
        :class:`~skid.nn._joint.JointFactorization` over the readings when they read several,
        a :class:`~skid.nn._joint.BlockFactorization` when a grouped convolution makes or
        reads the channels. All have ``errors``, ``n_features`` and ``select(k)``; the last
        two also ``interpolations(keep)``, one ``T`` per reading.
    n_samples : int
    """
    global _passes
    device, dtype = model_device_dtype(model)
    modules = dict(model.named_modules())
    readings = [reading_consumers(unit) for unit in units]
    accumulators = [
        [GramAccumulator(precision) if method == "gram" else QRAccumulator() for _ in unit_readers]
        for unit_readers in readings
    ]
    # the first batch's rows apart, for units that judge candidates on them (one reading)
    held = [(GramAccumulator(precision) if method == "gram" else QRAccumulator())
            if unit_kind(u).holds_out(u) else None for u in units]
    # data-parallel: the batch every rank agrees is the first, on the rank it comes from
    # (``batches.first`` is that batch on every rank, so it does not say which)
    holding = any(h is not None for h in held) and _distributed.owns_first_batch(
        batches.n_batches != 0)
    state = _HookState(sum(len(r) for r in readings))  # several groups may hook one module
    handles = []
    n_samples = 0
    try:
        for unit, unit_readers, unit_accs, unit_held in zip(units, readings, accumulators, held,
                                                            strict=True):
            for consumer, acc in zip(unit_readers, unit_accs, strict=True):
                columns = _columns(model, consumer, unit)
                hook = _accumulating_hook(unit, consumer, acc, state, columns, key=len(handles),
                                          held=unit_held)
                handles.append(modules[consumer.name].register_forward_pre_hook(hook))
        with torch.no_grad():
            for index, batch in enumerate(_progress(batches, verbose)):
                args, kwargs = to_inputs(batch, device, dtype)
                n_samples += batch_size_of(args, kwargs)
                state.start(kwargs.get("attention_mask"), holding=holding and index == 0)
                _passes += 1
                try:
                    run_model(model, args, kwargs)
                except StopForward:
                    pass
                except _NonFiniteActivations as exc:
                    raise ValueError(str(exc)) from None
    finally:
        for handle in handles:
            handle.remove()
    flat = [acc for unit_accs in accumulators for acc in unit_accs]
    widths = [statistic_width(u)
              for u, unit_accs in zip(units, accumulators, strict=True) for _ in unit_accs]
    # the held-out rows are judged by what the output projection makes of them
    weights = [consumer_weight_gram(model, u, reading_consumers(u)[0]) if h is not None
               else None for u, h in zip(units, held, strict=True)]
    flat += [h for h in held if h is not None]
    widths += [statistic_width(u) for u, h in zip(units, held, strict=True) if h is not None]
    n_samples = _distributed.reduce_statistics(flat, widths, n_samples)
    jobs = list(zip(units, accumulators, held, weights, strict=True))
    return _factorize_all(jobs), n_samples


def _factorize_all(jobs) -> list:
    """``_factorize`` of each job, in order, the units side by side where they are wide enough
    (:func:`._parallel.map_units`)."""
    return map_units(lambda job: _factorize(*job), jobs,
                     [statistic_width(unit) for unit, *_ in jobs])


def _statistic_gram(accumulator) -> np.ndarray:
    """The accumulated ``XᵀX`` (float64, on the host), up to the accumulator's power-of-two
    scale: the head ID's choice, errors and ``T`` do not depend on a positive scale."""
    if not isinstance(accumulator, GramAccumulator):  # TSQR: RᵀR
        R = _array.to_numpy(accumulator.R).astype(np.float64)
        gram = R.T @ R
    else:
        gram = accumulator.host_gram()  # a new array
    if not np.isfinite(gram).all():
        raise ValueError("The statistics hold NaN or infinite values.")
    return gram


def statistic_width(unit) -> int:
    """Columns of a unit's statistic: what its kind reads (and the constant column of
    ``fit_intercept``)."""
    return unit_kind(unit).statistic_width(unit) + _intercept.applies(unit)


def reading_consumers(unit):
    """One consumer per reading of the group (the first that reads each member tensor)."""
    first = {}
    for consumer in unit.consumers:
        first.setdefault(consumer.reads, consumer)
    return [first[r] for r in range(unit.n_readings)]


#: Set while a caller needs the statistics pass to go on past the last consumer (block-wise
#: calibration records the block's outputs in the same pass).
_RUN_TO_THE_END = contextvars.ContextVar("skid_run_to_the_end", default=False)


@contextlib.contextmanager
def running_to_the_end():
    """Statistics passes inside this block do not stop after the last consumer."""
    token = _RUN_TO_THE_END.set(True)
    try:
        yield
    finally:
        _RUN_TO_THE_END.reset(token)


class _HookState:
    """Per-batch state shared by the hooks: the padding mask and which consumers have run."""

    def __init__(self, n_consumers: int):
        self.n_consumers = n_consumers
        self.mask = None
        self.seen = set()
        self.holding = False

    def start(self, mask, holding: bool = False) -> None:
        """Reset for a new batch; keep a (batch, sequence) attention mask if there is one;
        ``holding``: the batch's rows go to the held-out statistics where a unit has them."""
        is_mask = isinstance(mask, torch.Tensor) and mask.ndim == 2
        self.mask = mask.bool() if is_mask else None
        self.seen = set()
        self.holding = holding


def _columns(model, consumer, unit):
    """The group's channels in the consumer's input: all, or a slice of a concatenation."""
    if not consumer.before:
        return slice(None)
    offset = offset_of(model, consumer.before)
    return slice(offset, offset + unit.width)


def _accumulating_hook(unit, consumer, accumulator, state: _HookState, columns=slice(None),
                       key=None, held=None):
    """A forward pre-hook that feeds the consumer's input rows into ``accumulator`` (with a
    constant first column when the fit asks for an intercept), or into ``held`` while the
    state holds a batch out."""
    constant = _intercept.applies(unit)

    def hook(module, args):
        x = _drop_padding(module, args[0], state.mask)
        target = held if held is not None and state.holding else accumulator
        # Half-precision rows are upcast block by block inside the accumulator.
        try:
            Z = as_samples(module, x, consumer.positions)[:, columns]
            target.update(_intercept.with_constant(Z) if constant else Z)
        except NonFiniteDataError:  # NaN/Inf rows: the accumulator refused them, untouched
            raise _NonFiniteActivations(_non_finite_message(unit, consumer.name)) from None
        state.seen.add(consumer.name if key is None else key)
        if len(state.seen) == state.n_consumers and not _RUN_TO_THE_END.get():
            raise StopForward  # every consumer has been seen: the rest is not needed

    return hook


def _drop_padding(module, x, mask):
    """Rows of a (batch, sequence, channels) Linear input where the attention mask is 1."""
    if (
        mask is not None
        and module_kind(module) == "linear"
        and x.ndim == 3
        and tuple(x.shape[:2]) == tuple(mask.shape)
    ):
        # the kept rows' indices, then one gather: a quarter of the time of x[mask]
        rows = mask.to(x.device).reshape(-1).nonzero().squeeze(1)
        return x.flatten(0, 1).index_select(0, rows)
    return x


def corrective_statistics(model, reference, unit, batches, *, method="gram",
                          precision="float64", verbose=False, consumer=None):
    """The corrective statistics of one unit: its consumer's input in ``model`` against the
    same tensor in ``reference``, both run on every batch (two truncated passes).

    ``consumer`` (one of ``unit.consumers``, default the first) picks the reading of a group
    whose consumers read several tensors; its slice of a concatenation is taken in each model
    at that model's own offset.

    Parameters
    ----------
    model : nn.Module
        The model compressed so far (eval mode, on the calibration device); not modified.
    reference : nn.Module or None
        The original model, same device; ``None`` when the consumer's input is known to be
        unchanged (nothing upstream compressed yet): one pass, ``Z_o = Z_c``.
    unit : Unit
    batches : Batches
    method, precision, verbose
        As :func:`unit_statistics`.

    Returns
    -------
    statistics : skid._corrective.CrossStatistics
    n_samples : int
    """
    global _passes
    device, dtype = model_device_dtype(model)
    accumulator = CrossAccumulator(method, precision, intercept=_intercept.applies(unit))
    n_samples = 0
    with torch.no_grad():
        for batch in _progress(batches, verbose):
            args, kwargs = to_inputs(batch, device, dtype)
            n_samples += batch_size_of(args, kwargs)
            mask = _padding_mask(kwargs)
            original = None
            if reference is not None:
                original = _consumer_input(reference, unit, args, kwargs, mask, consumer)
            compressed = _consumer_input(model, unit, args, kwargs, mask, consumer)
            _passes += 1 + (reference is not None)
            if compressed is None or (reference is not None and original is None):
                raise ValueError(
                    f"No calibration data reached {unit.consumer!r} (the consumer of "
                    f"{unit.producer!r}): the forward pass never called it.")
            try:
                accumulator.update(compressed, original)
            except ValueError as exc:
                raise ValueError(
                    f"The inputs of {unit.consumer!r} in the compressed and the original "
                    f"model do not pair up row for row ({exc}); corrective calibration "
                    "needs the consumer to see the same rows in both.") from exc
    width = statistic_width(unit)
    n_samples = _distributed.reduce_cross(accumulator, width, n_samples)
    if getattr(accumulator, "n_samples", None) == 0:
        raise ValueError(_no_rows_message(unit, unit.consumer))
    statistics = accumulator.statistics()
    if not (np.isfinite(statistics.first).all() and np.isfinite(statistics.cross).all()):
        raise ValueError(
            f"The activations entering {unit.consumer!r} (the output channels of "
            f"{unit.producer!r}) hold NaN or infinite values; check the model and X "
            "for non-finite values.")
    return statistics, n_samples


def _padding_mask(kwargs):
    """The (batch, sequence) attention mask of a dict batch, as booleans, or None."""
    mask = kwargs.get("attention_mask")
    return mask.bool() if isinstance(mask, torch.Tensor) and mask.ndim == 2 else None


def _consumer_input(model, unit, args, kwargs, mask, consumer=None):
    """``Z`` (rows × the unit's channels) entering ``consumer`` (default: the unit's first) on
    its first call, padding dropped; the forward pass stops there. None if it never runs."""
    consumer = unit.consumers[0] if consumer is None else consumer
    columns = _columns(model, consumer, unit)
    captured = []

    def hook(module, inputs):
        x = _drop_padding(module, inputs[0], mask)
        captured.append(as_samples(module, x, consumer.positions)[:, columns])
        raise StopForward

    handle = model.get_submodule(consumer.name).register_forward_pre_hook(hook)
    try:
        run_model(model, args, kwargs)
    except StopForward:
        pass
    finally:
        handle.remove()
    return captured[0] if captured else None


def _factorize(unit, accumulators, held=None, weights=None):
    """The group's factorization (joint over its readings), with errors that name the group;
    ``held``: the first batch's statistics of a unit that holds it out (its one reading's
    ``accumulators[0]`` has the other rows), judged by the consumer's ``weights`` (``WᵀW``)."""
    split = held is not None and held.n_samples > 0 and accumulators[0].n_samples > 0
    if held is not None and not split:  # one batch, or no rows: nothing to hold out
        accumulators = [accumulators[0].merge(held)]
    for consumer, accumulator in zip(reading_consumers(unit), accumulators, strict=True):
        if accumulator.n_features is None:
            raise ValueError(
                f"No calibration data reached {consumer.name!r} (a consumer of "
                f"{unit.producer!r}): the forward pass never called it."
            )
        if getattr(accumulator, "n_samples", None) == 0:
            raise ValueError(_no_rows_message(unit, consumer.name))
    try:
        if _intercept.applies(unit):
            return _intercept_factorization(unit, accumulators[0])
        kind = unit_kind(unit)
        if split:
            rest = accumulators[0]
            gram, held_out = HeldOutGrams.combined(_statistic_gram(rest), rest.scale_exp,
                                                   _statistic_gram(held), held.scale_exp,
                                                   weights)
            return kind.gram_factorization(gram, unit, held_out=held_out)
        if kind.gram_factorization is not None:  # e.g. whole heads from one Gram
            return kind.gram_factorization(_statistic_gram(accumulators[0]), unit)
        if unit.blocks > 1:
            return BlockFactorization.from_accumulators(accumulators, unit.blocks,
                                                        kind.sums_readings)
        if len(accumulators) == 1:
            return accumulators[0].factorize(consume=True)  # dropped after: no m × m copy
        return JointFactorization.from_accumulators(accumulators, summed=kind.sums_readings)
    except ValueError as exc:
        raise ValueError(f"{_non_finite_message(unit)} ({exc})") from exc


def _intercept_factorization(unit, accumulator):
    """``fit_intercept``: the ID of the centred rows (a kind with its own Gram factorization,
    heads: that factorization of their centred Gram), with the means that give the consumer's
    constant."""
    factorization = unit_kind(unit).gram_factorization
    if factorization is None:
        return _intercept.InterceptFactorization.from_accumulator(accumulator)
    centred, mean, sq_norm = _intercept.centred_gram(_statistic_gram(accumulator))
    fac = factorization(centred, unit)
    fac.means = (mean, mean)
    fac.errors = fac.errors * np.sqrt(max(float(np.trace(centred)), 0.0) / sq_norm)
    return fac


def _no_rows_message(unit, consumer) -> str:
    return (
        f"No non-padding rows reached {consumer!r} (a consumer of {unit.producer!r}): every "
        "row was left out as padding (X's attention_mask is 0 everywhere), or X holds no "
        "rows. Give calibration data with real tokens (attention_mask 1 where they are)."
    )


def _non_finite_message(unit, consumer=None) -> str:
    return (
        f"The activations entering {consumer or unit.consumer!r} (the output channels of "
        f"{unit.producer!r}) hold NaN or infinite values; check X for non-finite values, and "
        "the model for an overflow (a half-precision model on large inputs, say)"
    )


def _progress(batches, verbose: bool):
    """Batches, wrapped in a tqdm bar when verbose."""
    if not verbose:
        return batches
    from tqdm.auto import tqdm

    return tqdm(batches, total=batches.n_batches, desc="calibration", unit="batch")


# ------------------------------------------------------------------------------------ cache


def model_fingerprint(model: nn.Module, args: tuple, kwargs: dict | None = None) -> str:
    """A hash of what a model computes: the ops it runs on ``(args, kwargs)``, its tensors.

    The ops come from one recorded forward pass on the example inputs (``repr`` would miss an
    edited ``forward``); the versions of skid and torch are part of it, as they decide the
    statistics too.
    """
    from .. import __version__

    digest = hashlib.blake2b(digest_size=20)
    digest.update(f"skid {__version__} torch {torch.__version__}\n".encode())
    digest.update(describe_execution(model, args, kwargs).encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        hash_value(digest, tensor)
    return digest.hexdigest()


def fingerprint(*parts) -> str:
    """A hash of strings, arrays and nested sequences of them."""
    digest = hashlib.blake2b(digest_size=20)
    hash_value(digest, list(parts))
    return digest.hexdigest()


class StatisticsCache:
    """Unit statistics, computed by :func:`unit_statistics` or read back from ``memory``.

    Parameters
    ----------
    memory : None, str, path-like or joblib.Memory
        Where to cache; None computes every time.
    """

    def __init__(self, memory):
        if isinstance(memory, (str, os.PathLike)):
            memory = joblib.Memory(os.fspath(memory), verbose=0)
        self.memory = memory

    def get(self, key: str, model, units, batches, *, method, precision, verbose):
        """Statistics of ``units`` on ``model``; ``key`` must identify model, data and settings."""
        settings = dict(method=method, precision=precision, verbose=verbose)
        if self.memory is None:
            return unit_statistics(model, units, batches, **settings)
        cached = self.memory.cache(_keyed_statistics, ignore=["model", "batches", "verbose"])
        args = (key, units, method, precision)
        kwargs = dict(model=model, batches=batches, verbose=verbose)
        return _agreed_call(cached, args, kwargs)

    def corrective(self, key, model, reference, unit, batches, *, method, precision, verbose,
                   consumer=None):
        """:func:`corrective_statistics`; ``key`` must identify both models, data, settings."""
        settings = dict(method=method, precision=precision, verbose=verbose, consumer=consumer)
        if self.memory is None:
            return corrective_statistics(model, reference, unit, batches, **settings)
        cached = self.memory.cache(
            _keyed_corrective, ignore=["model", "reference", "batches", "verbose"])
        args = (key, unit, method, precision, consumer)
        kwargs = dict(model=model, reference=reference, batches=batches, verbose=verbose)
        return _agreed_call(cached, args, kwargs)


def _agreed_call(cached, args, kwargs):
    """``cached(*args, **kwargs)``; data-parallel, every rank reads the cache or every rank
    computes (the computation reduces over the ranks: one rank skipping it leaves the others
    waiting)."""
    if _distributed.current() is None:
        return cached(*args, **kwargs)
    if _distributed.all_hit(cached.check_call_in_cache(*args, **kwargs)):
        return cached(*args, **kwargs)
    result = cached.call(*args, **kwargs)  # joblib >= 1.4: (output, metadata)
    return result[0] if isinstance(result[1], dict) else result


def _keyed_corrective(key, unit, method, precision, consumer, *, model, reference, batches,
                      verbose):
    """:func:`corrective_statistics` with a content key as the cache's argument."""
    return corrective_statistics(model, reference, unit, batches, method=method,
                                 precision=precision, verbose=verbose, consumer=consumer)


def _keyed_statistics(key, units, method, precision, *, model, batches, verbose):
    """:func:`unit_statistics` with a content key as the cache's argument (joblib hashes it)."""
    return unit_statistics(
        model, list(units), batches, method=method, precision=precision, verbose=verbose
    )
