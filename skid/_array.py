"""The only module that knows NumPy from CuPy from torch: kinds, devices, dtypes, host copies.

Arrays are handled in their own library and on their own device; only small (m × m) results
travel to the host.
"""

from __future__ import annotations

import math

import numpy as np


def array_kind(X) -> str:
    """``"torch"``, ``"cupy"``, ``"dask"`` or ``"numpy"`` (the rest: NumPy-convertible)."""
    module = type(X).__module__
    if module.startswith("torch"):
        return "torch"
    if module.startswith("cupy"):
        return "cupy"
    if module.startswith("dask.array"):
        return "dask"
    return "numpy"


def is_gpu(X) -> bool:
    """True for CuPy arrays and CUDA torch tensors."""
    kind = array_kind(X)
    return kind == "cupy" or (kind == "torch" and X.is_cuda)


def to_numpy(A) -> np.ndarray:
    """A host NumPy copy (or view, for CPU arrays) of ``A``."""
    kind = array_kind(A)
    if kind == "torch":
        return A.detach().cpu().numpy()
    if kind == "cupy":
        return A.get()
    return np.asarray(A)


def dtype_name(X) -> str:
    """The dtype as a NumPy-style name ("float32", "int64", ...), for any kind."""
    dtype = X.dtype
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:  # the first of its dtype (NumPy's str of a dtype runs Python code)
        name = _DTYPE_NAMES[dtype] = str(dtype).removeprefix("torch.")
        return name
    except TypeError:  # an unhashable dtype
        return str(dtype).removeprefix("torch.")


_DTYPE_NAMES: dict = {}


def from_numpy(A: np.ndarray, like, dtype: str | None = None):
    """``A`` as an array of the same kind and device as ``like`` (dtype name optional).

    Small results for a Dask ``like`` stay NumPy (Dask multiplies and indexes with them lazily).
    """
    kind = array_kind(like)
    dtype = dtype or str(A.dtype)
    if kind == "torch":
        import torch

        return torch.as_tensor(np.ascontiguousarray(A)).to(like.device, getattr(torch, dtype))
    if kind == "cupy":
        import cupy

        with cupy.cuda.Device(like.device.id):
            return cupy.asarray(A, dtype=dtype)
    return np.asarray(A, dtype=dtype)


def float_dtype_for(X) -> str:
    """The floating dtype skid computes in for ``X``: float32 stays float32, the rest float64."""
    return "float32" if dtype_name(X) in ("float32", "float16", "bfloat16") else "float64"


def astype(X, dtype: str):
    """``X`` cast to the dtype name, in its own library (no copy when it already is)."""
    if array_kind(X) == "torch":
        import torch

        return X.to(getattr(torch, dtype))
    return X.astype(dtype, copy=False)


def exact_float32_matmul(X) -> bool:
    """False when torch may multiply float32 in reduced precision (TF32 or bf16 allowed)."""
    if array_kind(X) != "torch":
        return True
    import torch

    return torch.get_float32_matmul_precision() == "highest"


def all_finite(X) -> bool:
    """True when no entry of ``X`` is NaN or infinite (evaluated on the array's device)."""
    kind = array_kind(X)
    if kind == "torch":
        import torch

        return bool(torch.isfinite(X).all())
    if kind == "cupy":
        import cupy

        return bool(cupy.isfinite(X).all())
    return bool(np.isfinite(X).all())


def max_abs(X) -> float:
    """``max |X|`` as a Python float, NaN when any entry is NaN (no copy of X is made)."""
    if (X.numel() if array_kind(X) == "torch" else X.size) == 0:
        return 0.0
    if array_kind(X) == "torch":
        import torch

        low, high = (float(v) for v in torch.aminmax(X))
    else:
        low, high = float(X.min()), float(X.max())
    if math.isnan(low) or math.isnan(high):
        return math.nan
    return max(high, -low)


def max_column_sq_sum(X) -> float:
    """The largest column sum of squares of the 2-D ``X``, summed in X's dtype: the largest
    diagonal entry of ``XᵀX`` without the product (NaN propagates, infinite on overflow)."""
    if X.shape[1] == 0:
        return 0.0
    kind = array_kind(X)
    if kind == "numpy":
        return float(np.einsum("ij,ij->j", X, X).max())  # no n × m temporary
    # torch/CuPy einsum is 4× slower than a product and a sum; rows in chunks bound the temporary
    sums = None
    for start in range(0, X.shape[0], _SQ_SUM_ROWS):
        chunk = X[start : start + _SQ_SUM_ROWS]
        part = (chunk * chunk).sum(0)
        sums = part if sums is None else sums + part
    return 0.0 if sums is None else float(sums.max())


_SQ_SUM_ROWS = 512  # rows squared at a time (a temporary of 512 × m)


def tril(A, k: int = 0):
    """The lower triangle of the square ``A`` (below the k-th diagonal), in A's library."""
    kind = array_kind(A)
    if kind == "torch":
        return A.tril(k)
    if kind == "cupy":
        import cupy

        return cupy.tril(A, k)
    return np.tril(A, k)


def copy(A):
    """A copy of ``A`` in its own library and device."""
    return A.clone() if array_kind(A) == "torch" else A.copy()


def vstack(blocks, like):
    """Row-stack blocks of the same kind as ``like``."""
    if array_kind(like) == "torch":
        import torch

        return torch.cat(blocks, dim=0)
    if array_kind(like) == "cupy":
        import cupy

        return cupy.vstack(blocks)
    return np.vstack(blocks)


def qr_r(A):
    """The R factor of a QR factorization of ``A`` (n × m), in A's library and dtype."""
    kind = array_kind(A)
    if kind == "torch":
        import torch

        return torch.linalg.qr(A, mode="r")[1]
    if kind == "cupy":
        import cupy

        return cupy.linalg.qr(A, mode="r")
    # NumPy's geqrf wrapper: SciPy's qr(mode="r") was measured 3-12× slower on row blocks.
    return np.linalg.qr(A, mode="r")


def zeros(shape, like, dtype: str):
    """A zero array of the kind and device of ``like``."""
    kind = array_kind(like)
    if kind == "torch":
        import torch

        return torch.zeros(shape, dtype=getattr(torch, dtype), device=like.device)
    if kind == "cupy":
        import cupy

        return cupy.zeros(shape, dtype=dtype)
    return np.zeros(shape, dtype=dtype)


def frob_norm(X) -> float:
    """Frobenius norm as a Python float (computed in float64 on the array's device).

    Data whose squares overflow or underflow float64 are scaled by a power of two first.
    """
    if array_kind(X) == "dask":
        from . import _dask

        return _dask.frob_norm(X)
    norm = _frob_norm(X)
    if 2.0**-500 < norm < 2.0**500:
        return norm
    amax = max_abs(X)
    if not math.isfinite(amax) or amax == 0:
        return norm
    exp = math.frexp(amax)[1]
    return math.ldexp(_frob_norm(astype(X, "float64") * math.ldexp(1.0, -exp)), exp)


def _frob_norm(X) -> float:
    if array_kind(X) == "torch":
        import torch

        return float(torch.linalg.vector_norm(X.to(torch.float64)))
    xp = array_namespace(X)
    return float(xp.linalg.norm(X.astype("float64", copy=False).ravel()))


def array_namespace(X):
    if array_kind(X) == "cupy":
        import cupy

        return cupy
    return np
