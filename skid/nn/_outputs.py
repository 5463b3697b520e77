"""A model's outputs: on a whole data set (``transform``) or one calibration batch (the
``target_flops`` candidates are compared on it)."""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import nn

from ._calibration import Batches, model_device_dtype, run_model, to_inputs

__all__ = ["batch_outputs", "first_tensor", "model_outputs", "output_distance"]


def model_outputs(model: nn.Module, X, batch_size: int) -> np.ndarray:
    """A model's outputs on ``X`` (eval, no_grad), first tensor, as (n_samples, outputs)."""
    device, dtype = model_device_dtype(model)
    outputs = []
    with _eval_mode(model), torch.no_grad():
        for batch in Batches(X, batch_size):
            args, kwargs = to_inputs(batch, device, dtype)
            out = first_tensor(run_model(model, args, kwargs, what="batch"))
            out = out.reshape(out.shape[0], -1) if out.ndim else out.reshape(1, 1)
            if out.dtype in (torch.float16, torch.bfloat16):
                out = out.float()
            outputs.append(out.cpu())
    return torch.cat(outputs).numpy()


def keyed_outputs(key, *, model, batches, batch_size) -> np.ndarray:
    """:func:`model_outputs` with a content key as the cache's argument (joblib hashes it)."""
    return model_outputs(model, batches, batch_size)


def batch_outputs(model, batch) -> torch.Tensor:
    """``model``'s (first) output on one calibration batch, in float64: what the candidates of
    ``target_flops`` are compared on."""
    device, dtype = model_device_dtype(model)
    args, kwargs = to_inputs(batch, device, dtype)
    with torch.no_grad():
        return first_tensor(run_model(model, args, kwargs)).double()


def output_distance(model, reference, batch) -> float:
    """Frobenius distance of ``model``'s outputs on ``batch`` from ``reference``."""
    return float(torch.linalg.vector_norm(batch_outputs(model, batch) - reference))


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """Eval mode for the duration, then every submodule's training flag as it was."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes.items():
            module.training = training


def first_tensor(output) -> torch.Tensor:
    """A model output reduced to its first tensor (tuple, list, dict or HF ModelOutput)."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "values") and callable(output.values):
        items = list(output.values())
    elif isinstance(output, (tuple, list)):
        items = list(output)
    else:
        items = []
    for item in items:
        with contextlib.suppress(TypeError):
            return first_tensor(item)
    raise TypeError(f"The model returned a {type(output).__name__} without any tensor.")
