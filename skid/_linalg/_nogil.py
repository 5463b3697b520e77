"""LAPACK's pivoted Cholesky without holding Python's GIL.

SciPy's f2py wrapper ``scipy.linalg.lapack.dpstrf`` keeps the GIL for the whole call: any
other Python thread, even one in NumPy's BLAS, waits for it to end (measured: 67 ms, a
1,536-wide ``dpstrf``). So the units that :mod:`skid.nn._parallel` factorizes side by side
waited for each other's ``dpstrf``: MiniLM's head selection (13 ms alone) took as long as its
FFN's factorization beside it. The same routine is called here through SciPy's Cython LAPACK
API (``scipy.linalg.cython_lapack``: the C entry points SciPy exports for other extension
modules) by ``ctypes``, which lets the GIL go for the call: the same LAPACK, the same
arguments, the same result bit for bit. A SciPy that exports it otherwise (the capsule's C
signature is checked) gets SciPy's own wrapper.
"""

from __future__ import annotations

import ctypes

import numpy as np

__all__ = ["dpstrf"]

_INT = ctypes.POINTER(ctypes.c_int)
_DOUBLE = ctypes.POINTER(ctypes.c_double)
_routines = {}


#: ``dpstrf``'s C signature as Cython names it in the capsule: ``void (char *, int *, d *, int
#: *, ...)``, ``d`` SciPy's typedef of double (LAPACK's 32-bit integers).
_DPSTRF_ARGS = ("char *", "int *", "d *", "int *", "int *", "int *", "d *", "d *", "int *")


def _routine(name: str, expected: tuple, *argtypes):
    """The C function ``name`` of ``scipy.linalg.cython_lapack``, called without the GIL; None
    where SciPy does not export it with the ``expected`` argument types (another SciPy: its
    f2py wrapper is used then)."""
    if name not in _routines:  # found once (threads that race here find the same)
        _routines[name] = _exported(name, expected, argtypes)
    return _routines[name]


def _exported(name: str, expected: tuple, argtypes):
    try:
        from scipy.linalg import cython_lapack

        capsule = cython_lapack.__pyx_capi__[name]
    except (ImportError, AttributeError, KeyError):
        return None
    # prototypes of our own: ctypes.pythonapi's shared attributes are left as they are
    get_name = ctypes.PYFUNCTYPE(ctypes.c_char_p, ctypes.py_object)(
        ("PyCapsule_GetName", ctypes.pythonapi))
    get_pointer = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.py_object, ctypes.c_char_p)(
        ("PyCapsule_GetPointer", ctypes.pythonapi))
    signature = get_name(capsule)
    if _arguments(signature) != expected:
        return None
    return ctypes.CFUNCTYPE(None, *argtypes)(get_pointer(capsule, signature))


def _arguments(signature: bytes) -> tuple:
    """The argument types of a capsule's C signature, SciPy's double typedef as ``d *``."""
    text = signature.decode()
    if not text.startswith("void (") or not text.endswith(")"):
        return ()
    arguments = text[len("void (") : -1].split(", ")
    return tuple("d *" if a.endswith("_d *") else a for a in arguments)


def dpstrf(a: np.ndarray, lower: bool, tol: float):
    """``scipy.linalg.lapack.dpstrf(a, lower=lower, tol=tol, overwrite_a=True)`` for a
    Fortran-ordered float64 ``a``, factorized in place: ``(a, piv, rank, info)``, ``piv``
    1-based as LAPACK gives it. Only the factor's triangle is defined (the f2py wrapper's
    zeros in the other one are not written: callers read the factor's own)."""
    n = a.shape[0]
    if a.dtype != np.float64 or a.shape != (n, n) or not (
        a.flags.f_contiguous and a.flags.writeable
    ):
        raise ValueError("dpstrf needs a square, writeable, Fortran-ordered float64 array; "
                         f"got {a.dtype} of shape {a.shape}.")
    function = _routine("dpstrf", _DPSTRF_ARGS, ctypes.c_char_p, _INT, _DOUBLE, _INT, _INT,
                        _INT, _DOUBLE, _DOUBLE, _INT)
    if function is None:  # as SciPy's wrapper has it (holding the GIL)
        from scipy.linalg import lapack

        return lapack.dpstrf(a, lower=int(lower), tol=tol, overwrite_a=True)
    piv = np.zeros(n, dtype=np.intc)
    work = np.empty(2 * max(n, 1))
    size, lda = ctypes.c_int(n), ctypes.c_int(max(n, 1))
    rank, info, tolerance = ctypes.c_int(0), ctypes.c_int(0), ctypes.c_double(tol)
    function(b"L" if lower else b"U", ctypes.byref(size), a.ctypes.data_as(_DOUBLE),
             ctypes.byref(lda), piv.ctypes.data_as(_INT), ctypes.byref(rank),
             ctypes.byref(tolerance), work.ctypes.data_as(_DOUBLE), ctypes.byref(info))
    return a, piv, rank.value, info.value
