"""One BLAS thread for the small m × m steps that follow a large product."""

from __future__ import annotations

import contextlib
import threading

_SMALL_FACTOR = 2048  # m × m steps up to this size run on one BLAS thread
_controller = None
# threadpoolctl's limit is process-global: concurrent steps share one limit, set by the first
# to enter and restored by the last to leave, so interleaved exits never restore a stale count
_lock = threading.Lock()
_holders = 0
_limiter = None


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
    entrant sets the limit, the last to leave restores the limits found before it."""
    global _controller, _holders, _limiter
    with _lock:
        if _holders == 0:
            if _controller is None:
                from threadpoolctl import ThreadpoolController

                _controller = ThreadpoolController()
            _limiter = _as_any_thread(lambda: _controller.limit(limits=1, user_api="blas"))
        _holders += 1
    try:
        yield
    finally:
        with _lock:
            _holders -= 1
            if _holders == 0:
                _as_any_thread(_limiter.restore_original_limits)
                _limiter = None


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
