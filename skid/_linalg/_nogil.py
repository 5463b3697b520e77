"""LAPACK's pivoted Cholesky and BLAS's triangular solve without holding Python's GIL.

SciPy's f2py wrapper ``scipy.linalg.lapack.dpstrf`` keeps the GIL for the whole call: any
other Python thread, even one in NumPy's BLAS, waits for it to end (measured: 67 ms, a
1,536-wide ``dpstrf``). So the units that :mod:`skid.nn._parallel` factorizes side by side
waited for each other's ``dpstrf``: MiniLM's head selection (13 ms alone) took as long as its
FFN's factorization beside it. The same routine is called here through SciPy's Cython LAPACK
API (``scipy.linalg.cython_lapack``: the C entry points SciPy exports for other extension
modules) by ``ctypes``, which lets the GIL go for the call: the same LAPACK, the same
arguments, the same result bit for bit. A SciPy that exports it otherwise (the capsule's C
signature is checked) gets SciPy's own wrapper.

The triangular solve (``dtrsm``, from ``scipy.linalg.cython_blas``) is called the same way for
another reason too: it reads a triangle and right-hand sides in place from any column-major
views (a leading dimension larger than the rows), where ``solve_triangular`` first copies
both into Fortran order — for the interpolation matrix of a 1,536-wide factor, a 15 MB copy
of the kept pivots' triangle (:meth:`~skid._linalg.PivotedFactorization.select`).
"""

from __future__ import annotations

import ctypes

import numpy as np

from ._blocking import leading_dimension

__all__ = ["dpstrf", "dtrsm"]

_INT = ctypes.POINTER(ctypes.c_int)
_DOUBLE = ctypes.POINTER(ctypes.c_double)
_routines = {}


#: ``dpstrf``'s C signature as Cython names it in the capsule: ``void (char *, int *, d *, int
#: *, ...)``, ``d`` SciPy's typedef of double (LAPACK's 32-bit integers).
_DPSTRF_ARGS = ("char *", "int *", "d *", "int *", "int *", "int *", "d *", "d *", "int *")
#: ``dtrsm``'s: side, uplo, transa, diag, m, n, alpha, a, lda, b, ldb.
_DTRSM_ARGS = ("char *",) * 4 + ("int *", "int *", "d *", "d *", "int *", "d *", "int *")


def _routine(name: str, expected: tuple, *argtypes, library: str = "cython_lapack"):
    """The C function ``name`` of ``scipy.linalg.<library>``, called without the GIL; None
    where SciPy does not export it with the ``expected`` argument types (another SciPy: its
    f2py wrapper is used then)."""
    if name not in _routines:  # found once (threads that race here find the same)
        _routines[name] = _exported(name, expected, argtypes, library)
    return _routines[name]


def _exported(name: str, expected: tuple, argtypes, library: str):
    try:
        import importlib

        capsule = importlib.import_module(f"scipy.linalg.{library}").__pyx_capi__[name]
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


def dtrsm(a: np.ndarray, b: np.ndarray, *, right: bool, lower: bool) -> np.ndarray:
    """``b ← b a⁻¹`` (``right``) or ``a⁻¹ b``, ``a`` the lower or upper triangle of a square
    float64 array (non-unit diagonal, not transposed), ``b`` solved in place and returned.

    Both are read in place from column-major views (``a`` may be a corner of a larger
    array: its leading dimension is its column stride); ``b`` must be writeable. A
    triangle with a zero on its diagonal is the caller's to rule out (BLAS does not check).
    """
    m, n = b.shape
    if m == 0 or n == 0:
        return b
    size = n if right else m
    lda, ldb = (leading_dimension(x) if x.dtype == np.float64 and x.ndim == 2 else None
                for x in (a, b))
    if a.shape != (size, size) or lda is None or ldb is None or not b.flags.writeable:
        raise ValueError("dtrsm needs column-major float64 views (a square triangle and a "
                         f"writeable right-hand side); got {a.dtype} {a.shape} strides "
                         f"{a.strides} and {b.dtype} {b.shape} strides {b.strides}.")
    function = _routine("dtrsm", _DTRSM_ARGS, ctypes.c_char_p, ctypes.c_char_p,
                        ctypes.c_char_p, ctypes.c_char_p, _INT, _INT, _DOUBLE, _DOUBLE, _INT,
                        _DOUBLE, _INT, library="cython_blas")
    if function is None:  # SciPy's wrapper: copies, and the GIL held
        from scipy.linalg import blas

        b[...] = blas.dtrsm(1.0, a, b, side=int(right), lower=int(lower))
        return b
    rows, columns, one = ctypes.c_int(m), ctypes.c_int(n), ctypes.c_double(1.0)
    function(b"R" if right else b"L", b"L" if lower else b"U", b"N", b"N",
             ctypes.byref(rows), ctypes.byref(columns), ctypes.byref(one),
             a.ctypes.data_as(_DOUBLE), ctypes.byref(ctypes.c_int(lda)),
             b.ctypes.data_as(_DOUBLE), ctypes.byref(ctypes.c_int(ldb)))
    return b
