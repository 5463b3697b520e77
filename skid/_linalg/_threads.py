"""One BLAS thread for the small m × m steps that follow a large product."""

from __future__ import annotations

import contextlib
import threading

_SMALL_FACTOR = 2048  # m × m steps up to this size run on one BLAS thread
_libraries = None  # threadpoolctl's controllers of the BLAS libraries, found once
# the limit is process-global: concurrent steps share one limit, set by the first to enter
# and restored by the last to leave, so interleaved exits never restore a stale count
_lock = threading.Lock()
_holders = 0
_changed = ()  # (library, its thread count before) of each library the first entrant set


def small_step(m: int):
    """Context for an m × m step on the host: one BLAS thread when m is small.

    After the big product, the idle workers of NumPy's OpenBLAS keep spinning on the cores for
    a while; a multi-threaded SciPy LAPACK call started then competes with them and was
    measured 10× slower (≈130 ms instead of 11 ms for a 512 × 512 pivoted Cholesky).
    Safe to enter from several threads at once (see :func:`one_blas_thread`).
    """
    if m > _SMALL_FACTOR:
        return contextlib.nullcontext()
    return one_blas_thread()


@contextlib.contextmanager
def one_blas_thread():
    """BLAS on one thread inside the context, from any number of threads at once: the first
    entrant sets the limit, the last to leave restores the limits found before it.

    Only the libraries not on one thread already are set, straight through their controllers
    (threadpoolctl's ``limit`` reads every library's full description first: ≈ 0.1 ms per
    entry, 0.5 % of a 20,000 × 256 ID)."""
    global _holders, _changed
    with _lock:
        if _holders == 0:
            _changed = tuple((library, count) for library in _blas_libraries()
                             if (count := library.get_num_threads()) not in (None, 1))
            if _changed:
                _as_any_thread(lambda: _set_counts((library, 1) for library, _ in _changed))
        _holders += 1
    try:
        yield
    finally:
        with _lock:
            _holders -= 1
            if _holders == 0 and _changed:
                _as_any_thread(lambda: _set_counts(_changed))
                _changed = ()


def _blas_libraries():
    """threadpoolctl's controllers of the loaded BLAS libraries (found on the first call)."""
    global _libraries
    if _libraries is None:
        from threadpoolctl import ThreadpoolController

        _libraries = tuple(ThreadpoolController().select(user_api="blas").lib_controllers)
    return _libraries


def _set_counts(pairs) -> None:
    for library, count in pairs:
        library.set_num_threads(count)


def _as_any_thread(change):
    """``change()`` of the BLAS limits from whichever thread holds the last entry: newer
    threadpoolctl lets only the thread that first set a process-wide OpenBLAS pool set it
    again (others silently do nothing), which would leave the limit on when a worker thread
    is the last to leave. Control is released after, so no thread keeps it."""
    import threadpoolctl

    release = getattr(getattr(threadpoolctl, "OpenBLASController", None),
                      "clear_controlling_thread", None)
    if release is not None:
        release(force=True)
    try:
        return change()
    finally:
        if release is not None:
            release(force=True)
