"""A model's outputs: on a whole data set, batch by batch and unflattened (what
``skid.metrics`` compares; ``transform`` flattens them), or on one calibration batch (the
``target_flops`` candidates are compared on it).

:class:`ModelOutputs` keeps each batch's output as the model returned it ((n, classes),
(n, seq, vocab), (n, C, H, W), ...), together with what the batch says about its positions
(``attention_mask``) and its targets (``labels``, or the token ids of a language model).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ._calibration import (
    Batches,
    StatisticsCache,
    example_inputs,
    fingerprint,
    model_device_dtype,
    model_fingerprint,
    run_model,
    to_inputs,
)

__all__ = [
    "ModelOutputs",
    "batch_outputs",
    "cached_outputs",
    "collect_outputs",
    "first_tensor",
    "model_outputs",
    "output_distance",
]


@dataclass
class ModelOutputs:
    """A model's outputs on ``X``, one entry per batch.

    Attributes
    ----------
    values : list of ndarray
        Each batch's output, shape (n_batch, ...) as the model returned it (its ``logits`` for
        a Hugging Face ``ModelOutput``, else its first tensor); at least 2-D, float32 or
        float64.
    masks : list of ndarray or None
        Each batch's ``attention_mask`` (n_batch, seq) as booleans (True: a real token), or
        None when the batch has none.
    labels : list of ndarray or None
        Each batch's ``labels`` entry (a dict batch), or None.
    tokens : list of ndarray or None
        Each batch's integer token ids (``input_ids`` of a dict batch, or an integer tensor
        batch), or None.
    """

    values: list = field(default_factory=list)
    masks: list = field(default_factory=list)
    labels: list = field(default_factory=list)
    tokens: list = field(default_factory=list)

    @property
    def n_samples(self) -> int:
        """Number of samples over all batches."""
        return sum(len(v) for v in self.values)

    def flat(self) -> np.ndarray:
        """Every output as one (n_samples, n_outputs) array, each sample's output flattened."""
        rows = [v.reshape(len(v), -1) for v in self.values]
        widths = {r.shape[1] for r in rows}
        if len(widths) > 1:
            raise ValueError(
                f"The batches' outputs have different sizes per sample ({sorted(widths)}), "
                "e.g. sequences padded to each batch's longest: they cannot be flattened into "
                "one array. Pad every batch to one length, or compare them per position with "
                "skid.metrics."
            )
        return np.concatenate(rows) if rows else np.empty((0, 0), dtype=np.float32)


def collect_outputs(model: nn.Module, X, batch_size: int) -> ModelOutputs:
    """``model``'s outputs on ``X`` (eval mode, no_grad), batch by batch, unflattened."""
    device, dtype = model_device_dtype(model)
    collected = ModelOutputs()
    with eval_mode(model), torch.no_grad():
        for batch in Batches(X, batch_size):
            args, kwargs = to_inputs(batch, device, dtype)
            out = first_tensor(run_model(model, args, kwargs, what="batch"))
            out = out.reshape(1, 1) if out.ndim == 0 else out
            out = out[:, None] if out.ndim == 1 else out
            if out.dtype in (torch.float16, torch.bfloat16) or not out.is_floating_point():
                out = out.float()
            collected.values.append(out.cpu().numpy())
            collected.masks.append(_entry(kwargs, "attention_mask", bool))
            collected.labels.append(_entry(kwargs, "labels"))
            ids = kwargs.get("input_ids", args[0] if args else None)
            tokens = ids if isinstance(ids, torch.Tensor) and not ids.is_floating_point() else None
            collected.tokens.append(None if tokens is None else tokens.cpu().numpy())
    return collected


def model_outputs(model: nn.Module, X, batch_size: int) -> np.ndarray:
    """A model's outputs on ``X`` (eval, no_grad) as (n_samples, outputs): ``transform``."""
    return collect_outputs(model, X, batch_size).flat()


def batch_outputs(model, batch) -> torch.Tensor:
    """``model``'s output on one calibration batch, in float64: what the candidates of
    ``target_flops`` are compared on."""
    device, dtype = model_device_dtype(model)
    args, kwargs = to_inputs(batch, device, dtype)
    with torch.no_grad():
        return first_tensor(run_model(model, args, kwargs)).double()


def output_distance(model, reference, batch) -> float:
    """Frobenius distance of ``model``'s outputs on ``batch`` from ``reference``."""
    return float(torch.linalg.vector_norm(batch_outputs(model, batch) - reference))


def cached_outputs(model: nn.Module, X, batch_size: int, memory, model_key=None) -> ModelOutputs:
    """:func:`collect_outputs`, read from ``memory`` when the same model ran on the same data.

    ``model_key`` is the model's :func:`model_fingerprint` when known (it is computed
    otherwise), so the candidates of a grid search (clones, one per setting) run the original
    model over a test fold once.
    """
    if memory is None:
        return collect_outputs(model, X, batch_size)
    batches = Batches(X, batch_size, reusable=True)
    if model_key is None:
        model_key = model_fingerprint(model, *example_inputs(batches.first,
                                                             *model_device_dtype(model)))
    key = fingerprint("outputs", model_key, batches.fingerprint())
    cached = StatisticsCache(memory).memory.cache(
        _keyed_outputs, ignore=["model", "batches", "batch_size"])
    return cached(key, model=model, batches=batches, batch_size=batch_size)


def _keyed_outputs(key, *, model, batches, batch_size) -> ModelOutputs:
    """:func:`collect_outputs` with a content key as the cache's argument (joblib hashes it)."""
    return collect_outputs(model, batches, batch_size)


def _entry(kwargs: dict, name: str, dtype=None):
    """``kwargs[name]`` as a NumPy array (cast to ``dtype``), or None when it is no tensor."""
    value = kwargs.get(name)
    if not isinstance(value, torch.Tensor):
        return None
    value = value.detach().cpu().numpy()
    return value.astype(dtype) if dtype is not None else value


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Eval mode for the duration, then every submodule's training flag as it was."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes.items():
            module.training = training


def first_tensor(output) -> torch.Tensor:
    """The tensor a model's output stands for: a Hugging Face ``ModelOutput``'s ``logits`` (not
    its ``loss``, which comes first when the batch carries ``labels``), else the first tensor of
    a tuple, list or dict."""
    if isinstance(output, torch.Tensor):
        return output
    logits = output.get("logits") if isinstance(output, Mapping) else None
    if isinstance(logits, torch.Tensor):
        return logits
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
