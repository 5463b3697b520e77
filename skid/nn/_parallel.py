"""Host work on ``torch.get_num_threads()`` threads: the units' factorizations and selections
side by side (:func:`map_units`), and a wide head unit's independent parts
(:func:`map_for_width`), each from a width where threads pay.

Each job's LAPACK work runs on one BLAS thread and releases the GIL (the pivoted Cholesky
through :mod:`skid._linalg._nogil`: SciPy's wrapper holds it), so jobs run side by side; the
results are the sequential ones bit for bit, since every job's arithmetic is unchanged. One
BLAS thread per job suits the widths of MiniLM-sized models (a 1,536-wide ``dpstrf`` is only
1.2× faster on two threads); at 8,192 columns two threads make it 1.55× faster, so the widest
units of large models leave cores idle here (``benchmarks/README.md``, issue 20's fourth pass).
"""

from __future__ import annotations

import contextvars
from concurrent.futures import ThreadPoolExecutor

import torch

from .._linalg import one_blas_thread

__all__ = ["SIDE_BY_SIDE_WIDTH", "UNITS_SIDE_BY_SIDE_WIDTH", "map_for_width", "map_in_threads",
           "map_units"]

#: Width from which one statistic's independent host parts (a head unit's greedy modes, its
#: judged candidates) run side by side: each is then tens of milliseconds or more of BLAS and
#: LAPACK that release the GIL (1.3–1.45× on 2 cores at m = 768–4,096); narrower, they are
#: Python-bound milliseconds that threads only contend for (none faster at m = 512).
SIDE_BY_SIDE_WIDTH = 1024

#: Width of the widest unit's statistic from which the units' factorizations and selections run
#: side by side: narrower, a unit's job is a millisecond or a few of small steps that mostly
#: hold the GIL, and two threads only hand it back and forth (two threads, jobs of one fit:
#: 2 × 256 channels 5.7 ms against 2.5 in turn, 6 × 256 7.4 against 6.6, the benchmark
#: LLaMA's 2 × (96-wide heads, 256 channels) 18.3 against 15.1; 6 × 512 25 against 35,
#: 6 × 768 36 against 58).
UNITS_SIDE_BY_SIDE_WIDTH = 512


def map_in_threads(function, jobs) -> list:
    """``[function(job) for job in jobs]``, on up to ``torch.get_num_threads()`` workers, each
    in the caller's context (e.g. ``fit_intercept``) and BLAS on one thread. At most that many
    jobs are in flight (peak memory); the first failing job in order raises, no job starts
    after it."""
    jobs = list(jobs)
    workers = min(torch.get_num_threads(), len(jobs))
    if workers <= 1:
        return [function(job) for job in jobs]
    with one_blas_thread():  # entered here, so every worker's small steps find it set
        pool = ThreadPoolExecutor(workers)
        try:
            futures = [pool.submit(contextvars.copy_context().run, function, job)
                       for job in jobs]
            return [future.result() for future in futures]
        finally:
            pool.shutdown(cancel_futures=True)


def map_for_width(function, jobs, width: int) -> list:
    """``[function(job) for job in jobs]``: side by side (:func:`map_in_threads`) for the parts
    of a statistic at least :data:`SIDE_BY_SIDE_WIDTH` wide, in turn for a narrower one."""
    return _side_by_side_from(SIDE_BY_SIDE_WIDTH, function, jobs, width)


def map_units(function, jobs, widths) -> list:
    """``[function(job) for job in jobs]`` for the jobs of units whose statistics are
    ``widths`` wide: side by side (:func:`map_in_threads`) when the widest is at least
    :data:`UNITS_SIDE_BY_SIDE_WIDTH`, in turn otherwise."""
    return _side_by_side_from(UNITS_SIDE_BY_SIDE_WIDTH, function, jobs, max(widths, default=0))


def _side_by_side_from(threshold: int, function, jobs, width: int) -> list:
    if width < threshold:
        return [function(job) for job in jobs]
    return map_in_threads(function, jobs)
