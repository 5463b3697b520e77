"""Calibration data as batches, and the model inputs made from them.

:class:`Batches` slices ``X`` (arrays, tensors, dicts of them, or an iterable of batches) into
batches and fingerprints them for the statistics cache; :func:`to_inputs` and
:func:`example_inputs` turn a batch into a model's positional and keyword inputs on its device
and dtype, and :func:`run_model` runs it, rewording the model's own failure to point at ``X``.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterable, Mapping

import numpy as np
import torch
from torch import nn

__all__ = [
    "Batches",
    "StopForward",
    "batch_size_of",
    "example_inputs",
    "hash_value",
    "model_device_dtype",
    "run_model",
    "slice_rows",
    "to_inputs",
]


class StopForward(BaseException):
    """Raised by the last hook of a batch: the rest of the forward pass is not needed.

    A BaseException so that a model's own ``except Exception`` cannot swallow it.
    """


# --------------------------------------------------------------------------------- batches


class Batches:
    """The calibration data as a re-iterable sequence of raw batches.

    Parameters
    ----------
    X : tensor, ndarray, dict of those, or iterable of batches
        A tensor or array (n_samples, ...) or a dict of them (e.g. tokenized text) is cut into
        ``batch_size`` chunks along the first axis; any other iterable yields batches as they
        are. A one-shot iterator (a generator) is read once; with ``reusable=True`` its batches
        are kept so that it can be read again (several passes, or hashing for the cache).
    batch_size : int
    reusable : bool, default=False
    allow_empty : bool, default=False
        Accept data without any sample (a rank's empty shard in data-parallel calibration):
        ``first`` is then None and there are no batches.
    """

    def __init__(self, X, batch_size: int, *, reusable: bool = False, allow_empty: bool = False):
        self.batch_size = batch_size
        self._sliceable = _is_array(X) or isinstance(X, Mapping)
        if self._sliceable:
            self.n_samples = _check_sliceable(X, allow_empty)
            self._source = X
            self.first = slice_rows(X, 0, batch_size) if self.n_samples else None
            self.n_batches = -(-self.n_samples // batch_size)
            return
        if isinstance(X, (str, bytes)) or not isinstance(X, Iterable):
            raise TypeError(
                "X must be a torch tensor, a NumPy array, a dict of those, or an iterable of "
                f"batches (e.g. a DataLoader); got {type(X).__name__}."
            )
        iterator = iter(X)
        one_shot = iterator is X
        try:
            self.first = next(iterator)
        except StopIteration:
            if not allow_empty:
                raise ValueError("X is empty: it yielded no calibration batch.") from None
            self.first, self._source, self._one_shot, self.n_batches = None, [], False, 0
            return
        if one_shot:
            rest = list(iterator) if reusable else iterator
            self._source = [self.first, *rest] if reusable else itertools.chain([self.first], rest)
            self._spent = False
        else:
            self._source = X
        self._one_shot = one_shot and not reusable
        self.n_batches = len(X) if hasattr(X, "__len__") and not one_shot else None
        if isinstance(self._source, list):
            self.n_batches = len(self._source)

    def make_reusable(self) -> None:
        """Keep the batches of a one-shot iterator from now on, so that it can be read again."""
        if not self._sliceable and self._one_shot:
            if self._spent:
                raise RuntimeError("This one-shot iterator of batches was already consumed.")
            self._source = list(self._source)
            self._one_shot, self.n_batches = False, len(self._source)

    def __iter__(self):
        if self._sliceable:
            for start in range(0, self.n_samples, self.batch_size):
                yield slice_rows(self._source, start, self.batch_size)
            return
        if self._one_shot:
            if self._spent:
                raise RuntimeError("This one-shot iterator of batches was already consumed.")
            self._spent = True
        yield from self._source

    def split_first(self):
        """``(Batches of all but the first batch, the first batch)`` of re-readable batches (the
        rest may be empty); None for an iterable that is not a list."""
        if self._sliceable:
            start = min(self.batch_size, self.n_samples)
            rest = slice_rows(self._source, start, self.n_samples - start)
            return Batches(rest, self.batch_size, allow_empty=True), self.first
        if isinstance(self._source, list):
            return Batches(self._source[1:], self.batch_size, allow_empty=True), self.first
        return None

    def second(self):
        """The second batch of re-readable batches, or the first where there is one only."""
        if self._sliceable:
            if self.n_samples > self.batch_size:
                return slice_rows(self._source, self.batch_size, self.batch_size)
            return self.first
        iterator = iter(self)
        next(iterator, None)
        return next(iterator, self.first)

    @property
    def rereadable(self) -> bool:
        """False for a one-shot iterator read without ``reusable`` (one pass only)."""
        return not getattr(self, "_one_shot", False)

    def fingerprint(self) -> str:
        """A hash of every batch's content (the inputs only: labels do not change statistics)."""
        digest = hashlib.blake2b(digest_size=20)
        digest.update(f"batch_size={self.batch_size}".encode())
        for batch in self:
            hash_value(digest, _inputs_of(batch))
        return digest.hexdigest()


def _is_array(X) -> bool:
    """A torch tensor or a NumPy array."""
    return isinstance(X, (torch.Tensor, np.ndarray))


def _check_sliceable(X, allow_empty: bool = False) -> int:
    """Number of samples of an array or a dict of arrays (at least 2-D, not empty)."""
    arrays = [X] if _is_array(X) else [v for v in X.values() if _is_array(v)]
    if not arrays:
        raise ValueError("X is a dict without any tensor or array value.")
    for array in arrays:
        if array.ndim < 2:
            raise ValueError(
                f"X must have shape (n_samples, ...) with at least 2 dimensions; got an array of "
                f"shape {tuple(array.shape)}. Reshape a single sample with x[None]."
            )
    n_samples = {int(a.shape[0]) for a in arrays}
    if len(n_samples) > 1:
        raise ValueError(
            f"The arrays of X have different numbers of samples: {sorted(n_samples)}."
        )
    if n_samples == {0} and not allow_empty:
        raise ValueError("X is empty: it has 0 samples.")
    return n_samples.pop()


def slice_rows(X, start: int, size: int):
    """Rows ``start:start+size`` of an array, or of every array value of a dict."""
    if _is_array(X):
        return X[start : start + size]
    return {k: v[start : start + size] if _is_array(v) else v for k, v in X.items()}


def _inputs_of(batch):
    """The part of a raw batch the model sees: ``batch[0]`` of an (inputs, labels) pair."""
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError("A calibration batch is an empty tuple/list.")
        return batch[0]
    return batch


def hash_value(digest, value) -> None:
    """Feed a tensor, array, dict, sequence or scalar into a hash, structure included."""
    if isinstance(value, torch.Tensor):
        flat = value.detach().reshape(-1).contiguous().cpu()
        digest.update(f"T{value.dtype}{tuple(value.shape)}".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    elif isinstance(value, np.ndarray):
        digest.update(f"A{value.dtype}{value.shape}".encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    elif isinstance(value, Mapping):
        for key in sorted(value, key=str):
            digest.update(f"K{key!r}".encode())
            hash_value(digest, value[key])
    elif isinstance(value, (tuple, list)):
        digest.update(f"S{len(value)}".encode())
        for item in value:
            hash_value(digest, item)
    else:
        digest.update(f"V{value!r}".encode())


# ----------------------------------------------------------------------------- model inputs


def model_device_dtype(model: nn.Module):
    """The device and floating dtype of a model's first parameter (or buffer)."""
    tensors = itertools.chain(model.parameters(), model.buffers())
    device = None
    for tensor in tensors:
        device = device or tensor.device
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return device or torch.device("cpu"), torch.get_default_dtype()


def to_inputs(batch, device, dtype):
    """``(args, kwargs)`` for ``model(batch)``, ``model(**batch)`` or ``model(batch[0])``.

    Tensors and arrays go to ``device``; floating ones take the model's ``dtype``, integer ones
    (token ids) stay integer.
    """
    if isinstance(batch, Mapping):
        return (), {k: _to_tensor(v, device, dtype) for k, v in batch.items()}
    if _is_array(batch):
        return (_to_tensor(batch, device, dtype),), {}
    if isinstance(batch, (tuple, list)):
        return to_inputs(_inputs_of(batch), device, dtype)
    raise TypeError(
        "A calibration batch must be a tensor, an array, a dict (passed as model(**batch)) or "
        f"a tuple/list whose first item is the input; got {type(batch).__name__}."
    )


def _to_tensor(value, device, dtype):
    """A tensor on ``device``; floating values cast to ``dtype``; non-arrays unchanged."""
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise TypeError("A calibration batch holds a NumPy array of dtype object.")
        value = torch.from_numpy(np.ascontiguousarray(value))
    if not isinstance(value, torch.Tensor):
        return value
    if value.is_floating_point():
        return value.to(device=device, dtype=dtype)
    return value.to(device=device)


def example_inputs(batch, device, dtype, n_samples: int = 2):
    """The first ``n_samples`` samples of a batch as ``(args, kwargs)``, for the graph walk."""
    args, kwargs = to_inputs(batch, device, dtype)
    size = batch_size_of(args, kwargs)

    def head(value):
        if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == size:
            return value[:n_samples]
        return value

    return tuple(head(a) for a in args), {k: head(v) for k, v in kwargs.items()}


def batch_size_of(args, kwargs) -> int:
    """The first dimension of the first tensor among the model's inputs."""
    for value in itertools.chain(args, kwargs.values()):
        if isinstance(value, torch.Tensor) and value.ndim:
            return int(value.shape[0])
    raise ValueError("The calibration batch holds no tensor with a batch dimension.")


def run_model(model: nn.Module, args, kwargs, what: str = "calibration batch"):
    """``model(*args, **kwargs)``, with the model's own failure reworded to point at X."""
    try:
        return model(*args, **kwargs)
    except StopForward:
        raise
    except Exception as exc:
        raise ValueError(
            f"the model could not run on the {what} {_describe(args, kwargs)}; "
            f"check that X is batched like the model's input: {type(exc).__name__}: {exc}"
        ) from exc


def _describe(args, kwargs) -> str:
    """Shapes and dtypes of the model inputs, for error messages."""

    def one(value):
        if isinstance(value, torch.Tensor):
            return f"tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
        return type(value).__name__

    parts = [one(a) for a in args] + [f"{k}={one(v)}" for k, v in kwargs.items()]
    return "(" + ", ".join(parts) + ")"
