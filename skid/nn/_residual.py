"""The estimator's entry points for ``prune="residual"`` (transformer streams).

The stream is one more unit in the plan: found after the channel groups and heads (and placed
after them, so ``"sequential"`` calibrates it on the model compressed so far), with an error
curve the width rules read like any other, a selection that :func:`apply` folds in, and one
``layers_`` row. Its statistics are one Gram per reading norm from a pass over the whole model.
"""

from __future__ import annotations

import warnings

from . import _distributed
from ._calibration import fingerprint
from ._plan import Skipped
from ._rotation import (
    StreamFactorization,
    StreamSelection,
    apply_stream_selection,
    check_stream,
    stream_statistics,
)
from ._stream import Stream, find_stream
from ._unit_kinds import UnitKind, register_unit_kind

__all__ = ["apply", "blockwise", "factorize", "find", "is_residual", "report_row"]


def find(work, example, *, exclude=(), layers="auto") -> tuple[list, list]:
    """``([stream], [])`` when the model's stream can be pruned, else ``([], [Skipped])``.

    ``exclude`` naming any module of the stream (or a module holding one) leaves it alone;
    ``layers`` restricts pruning to the stream when it names ``"residual"`` or one of the
    stream's modules.
    """
    stream, skipped = find_stream(work)
    if stream is None:
        return [], [skipped]
    excluded = [m for m in (*stream.writers, *stream.readers, *(n.name for n in stream.norms))
                if any(m == e or m.startswith(e + ".") for e in _names(exclude))]
    if excluded:
        return [], [Skipped(stream.producer, f"residual stream: {excluded[0]!r} is excluded, "
                                             "and the stream's width is shared by all of it")]
    if layers != "auto":
        wanted = {n if isinstance(n, str) else n[0] for n in layers}
        if not wanted & {"residual", *stream.writers, *stream.readers}:
            return [], []
    reason = check_stream(work, stream, example)
    if reason is not None:
        return [], [Skipped(stream.producer, reason)]
    if stream.tied:
        # Untie rather than keep one weight with T = I: the head then reads the stream through
        # the final norm's gain exactly, at the cost of a second vocabulary-sized matrix.
        warnings.warn(
            f"The output head and the input embedding share one weight "
            f"({', '.join(' = '.join(pair) for pair in stream.tied)}); pruning the residual "
            "stream folds the final norm's gain into the head, so the compressed model unties "
            "them (its config says tie_word_embeddings=False; the embedding's parameters are "
            "counted twice).", UserWarning, stacklevel=4)
    return [stream], []


def blockwise(settings, work, units, layout, batches, key, cache, flops_info, home):
    """Block-wise calibration with a stream (never under ``target_flops``): the other units
    block by block, the stream from a pass of its own over the whole model where it waits —
    before the blocks fold anything for ``"original"``, after them otherwise (the model
    compressed so far)."""
    from ._blockwise import blockwise_plan
    from ._planner import Plan, Planner, StatisticsSource, plan_content, select
    from ._planner import apply as fold

    streams = [u for u in units if is_residual(u)]
    others = [u for u in units if not is_residual(u)]
    source = StatisticsSource(work, batches, cache, settings)
    planner = Planner(settings, streams, flops_info)
    early = None
    if streams and not settings.calibration.follows_compression:
        early = source.statistics(key, streams)
    plan = blockwise_plan(settings, work, others, layout, batches, key, cache, flops_info,
                          home)
    selections = list(plan.selections)
    for i, stream in enumerate(streams):
        step = None if key is None else fingerprint(key, "after", plan_content(selections))
        fac = early[i] if early is not None else source.statistics(step, [stream])[0]
        selection = select(stream, fac, planner.widths([fac], [stream])[0])
        fold(work, selection)
        selections.append(selection)
    return Plan(tuple(selections), plan.n_samples)


def _names(exclude) -> list:
    return [exclude] if isinstance(exclude, str) else list(exclude)


def is_residual(unit) -> bool:
    return isinstance(unit, Stream)


def factorize(work, stream: Stream, batches, how: str, *, cache=None,
              key=None) -> StreamFactorization:
    """The stream's error curve and selections, from a pass of ``batches`` through ``work``
    (read back from ``cache.memory`` when ``key``, a content key of model, data and settings,
    was computed before; one process only)."""
    memory = getattr(cache, "memory", None)
    if memory is None or key is None or _distributed.current() is not None:
        statistics = stream_statistics(work, stream, batches)
    else:
        cached = memory.cache(_keyed_statistics, ignore=["model", "batches"])
        statistics = cached(fingerprint(key, "residual"), stream, model=work, batches=batches)
    grams, counts, n_samples = statistics
    return StreamFactorization(stream, grams, counts, how, n_samples)


def _keyed_statistics(key, stream, *, model, batches):
    """:func:`stream_statistics` with a content key as the cache's argument."""
    return stream_statistics(model, stream, batches)


def apply(model, selection: StreamSelection) -> None:
    apply_stream_selection(model, selection)


def report_row(selection: StreamSelection) -> dict:
    """The stream's ``layers_`` row: writers, readers and norms, widths, error."""
    stream = selection.unit
    norm = {"rms": "RMSNorm", "rms_offset": "RMSNorm (1 + w)",
            "layer": "LayerNorm (writers made zero-mean)"}[stream.form]
    return UnitKind.row(selection, "residual", stream.writers, stream.readers, stream.width,
                        selection.width, norms=[n.name for n in stream.norms],
                        stream=selection.how, norm=norm,
                        untied=[list(pair) for pair in stream.tied])


class _StreamKind(UnitKind):
    """The planner's view of a stream: its own statistics, a rotation, one report row."""

    fits_corrective = False  # a rotation has no T to fit to the original model
    prune = "residual"

    def statistics(self, source, key, unit):
        fac = factorize(source.work, unit, source.batches, source.settings.stream,
                        cache=source.cache, key=key)
        source.n_samples = fac.n_calibration_samples
        return fac

    def select(self, unit, fac, k):
        return fac.select(int(k))

    def apply(self, model, selection) -> None:
        apply(model, selection)

    def report(self, selection) -> dict:
        return report_row(selection)

    def smallest(self, fac) -> int:
        return 2 if fac.stream.form == "layer" else 1  # LayerNorm: one direction and its sum

    def for_outputs(self, work, unit, fac, pivots):
        return fac  # one basis for every reader: no consumer to weigh the pivots by


register_unit_kind("residual", _StreamKind())
