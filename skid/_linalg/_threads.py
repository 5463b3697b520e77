"""One BLAS thread for the small m × m steps that follow a large product."""

from __future__ import annotations

import contextlib

_SMALL_FACTOR = 2048  # m × m steps up to this size run on one BLAS thread
_controller = None


def _small_step(m: int):
    """Context for an m × m step on the host: one BLAS thread when m is small.

    After the big product, the idle workers of NumPy's OpenBLAS keep spinning on the cores for
    a while; a multi-threaded SciPy LAPACK call started then competes with them and was
    measured 10× slower (≈130 ms instead of 11 ms for a 512 × 512 pivoted Cholesky).
    """
    global _controller
    if m > _SMALL_FACTOR:
        return contextlib.nullcontext()
    if _controller is None:
        from threadpoolctl import ThreadpoolController

        _controller = ThreadpoolController()
    return _controller.limit(limits=1, user_api="blas")
