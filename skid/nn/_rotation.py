"""Prune a transformer's residual stream: one orthogonal basis for the whole stream, sliced.

An RMS norm ``g ⊙ x / rms(x)`` commutes with an orthogonal ``Q`` once its gain ``g`` is folded
into the layers that read it, so writing the stream in the basis ``Q`` — embeddings ``E Q``,
every writer's output rows ``Qᵀ W``, every reader's input columns ``W diag(g) Q`` — leaves the
model's function unchanged, with no matrix on the shortcuts (the basis is the same at every
add). Keeping the first ``k`` columns of ``Q`` (the principal directions of the normalized
stream, one Gram per reading norm summed) makes the hidden size ``k``. The norm now averages
over ``k`` coordinates instead of ``d``: its gain becomes the constant ``sqrt(d / k)``, exact at
full width and right for every token whose energy lies in the kept directions. Each norm's
readers then read the kept directions through the least-squares map to what that norm saw
(from its own Gram) rather than the plain projection: on the benchmark's LLaMA that is better
at every width (``bench_fidelity.py``); ``errors`` stay the projection's, an upper bound.

LayerNorm first subtracts the mean: writing the stream in a basis orthogonal to the all-ones
vector makes every writer zero-mean (exact), and mapping the ``k - 1`` kept directions into the
zero-sum subspace of ``R^k`` (a Helmert basis) keeps the sliced stream zero-mean, so the
model's own LayerNorm still computes the right thing; its bias folds into the readers' biases
(or, for a reader without one, stays in the norm).

``stream="select"`` keeps stream coordinates instead (the joint ID): one kept set ``J`` for
every writer, a least-squares ``T`` per norm for its readers and a fitted RMS constant per norm.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import torch
from torch import nn

from .. import _linalg
from . import _calibration, _distributed, _surgery
from ._batches import batch_size_of, model_device_dtype, run_model, to_inputs
from ._outputs import first_tensor
from ._stream import Stream, get, random_rotation

__all__ = ["StreamFactorization", "StreamSelection", "apply_stream_selection",
           "stream_statistics"]


# ------------------------------------------------------------------------------ statistics


def stream_statistics(model: nn.Module, stream: Stream, batches) -> tuple[list, list, int]:
    """One Gram per norm of its normalized input rows (float64, d × d), the row counts, and
    the number of samples.

    Each row is the stream at one token as that norm sees it, centered for LayerNorm and
    divided by its RMS: what the norm passes on (before its gain), so every token counts once
    at every position. Padding rows (``attention_mask == 0``) are left out.
    """
    device, dtype = model_device_dtype(model)
    d = stream.width
    # the project's streamed statistic: float64 products of row blocks (no float64 copy of a
    # whole batch), the upper triangle only
    accumulators = [_linalg.GramAccumulator("float64") for _ in stream.norms]
    counts = [0] * len(stream.norms)
    mask, samples = [None], 0

    def hook_for(i):
        def hook(module, args):
            x = args[0].detach()
            m = mask[0]
            if m is not None and x.ndim == 3 and tuple(x.shape[:2]) == tuple(m.shape):
                x = x[m.to(x.device)]
            rows = normalized_rows(x.reshape(-1, d), stream.form)
            if rows.shape[0]:
                accumulators[i].update(rows)
            counts[i] += rows.shape[0]
        return hook

    handles = [model.get_submodule(n.name).register_forward_pre_hook(hook_for(i))
               for i, n in enumerate(stream.norms)]
    try:
        with torch.no_grad():
            for batch in batches:
                args, kwargs = to_inputs(batch, device, dtype)
                am = kwargs.get("attention_mask")
                mask[0] = am.bool() if isinstance(am, torch.Tensor) and am.ndim == 2 else None
                run_model(model, args, kwargs)
                samples += batch_size_of(args, kwargs)
                _calibration.count_calibration_pass()  # n_calibration_passes_ counts it too
    finally:
        for h in handles:
            h.remove()
    grams = [_dense_gram(acc, d, device) for acc in accumulators]
    grams = [_distributed.all_sum(g).cpu().numpy() for g in grams]
    counts = _distributed.all_sum(torch.tensor([*counts, samples], dtype=torch.float64))
    counts = [int(c) for c in counts]
    return grams, counts[:-1], counts[-1]


def _dense_gram(acc, d: int, device) -> torch.Tensor:
    """The accumulated ``XᵀX`` as a dense float64 tensor (zeros where no row came)."""
    gram = acc.gram
    if gram is None:
        return torch.zeros(d, d, dtype=torch.float64, device=device)
    # unit-RMS rows never need scaling, but the statistic's scale is part of its contract
    return torch.as_tensor(gram, device=device).mul(4.0**acc.scale_exp)


def normalized_rows(x: torch.Tensor, form: str) -> torch.Tensor:
    """Rows (n, d), centered for LayerNorm, divided by their RMS (zero rows: 0), in the
    activations' own precision (half precision in float32): the Gram multiplies them in
    float64 block by block."""
    if x.dtype not in (torch.float32, torch.float64):
        x = x.to(torch.float32)
    if form == "layer":
        x = x - x.mean(dim=1, keepdim=True)
    rms = x.pow(2).mean(dim=1, keepdim=True).sqrt()
    return x / torch.where(rms > 0, rms, torch.ones_like(rms))


# --------------------------------------------------------------------------- factorization


@dataclass(frozen=True)
class StreamSelection:
    """How the stream is rewritten at width ``k`` (every matrix float64, shape (k, d)).

    ``write`` maps a writer's output ``y`` (d,) to ``write @ y``; ``reads[p]`` gives norm
    ``p``'s readers ``n ≈ reads[p].T @ n'`` (``n`` the original normalized input, ``n'`` the new
    norm's output with unit gain); ``scales[p]`` is the new norm's constant gain.
    """

    unit: Stream
    write: torch.Tensor
    reads: tuple
    scales: tuple
    error: float
    how: str

    @property
    def width(self) -> int:
        return int(self.write.shape[0])


class StreamFactorization:
    """Error curve and selections of the stream from its per-norm Grams.

    Parameters
    ----------
    stream : Stream
    grams : list of ndarray (d, d)
        Per norm, the Gram of its normalized input rows (:func:`stream_statistics`).
    counts : list of int
        Rows behind each Gram.
    n_samples : int, optional
        Calibration samples behind them.
    how : {"rotate", "select"}
        One orthogonal basis sliced (default), or kept coordinates by the joint ID.
    """

    def __init__(self, stream: Stream, grams, counts, how: str = "rotate", n_samples=None):
        self.stream, self.grams, self.counts, self.how = stream, grams, counts, how
        self.n_calibration_samples = n_samples
        self.least_squares = True
        self.n_samples = min(counts) if counts else 0
        total = sum(grams)
        d = stream.width
        if how == "rotate":
            basis = helmert(d) if stream.form == "layer" else np.eye(d)
            values, vectors = np.linalg.eigh(basis.T @ total @ basis)
            order = np.argsort(values)[::-1]
            self.values = np.clip(values[order], 0.0, None)
            self.basis = basis @ vectors[:, order]  # d × (d or d - 1), principal first
            tail = np.concatenate([np.cumsum(self.values[::-1])[::-1], [0.0]])
            errors = np.sqrt(tail / max(tail[0], np.finfo(float).tiny))
            if stream.form == "layer":  # width k keeps k - 1 directions (the sum is zero)
                errors = np.concatenate([[1.0], errors])
            self.errors = np.minimum.accumulate(errors)
        elif how == "select":
            if stream.form == "layer":
                raise ValueError(
                    "stream='select' keeps stream coordinates, which a LayerNorm would "
                    "re-center over the kept ones; it supports RMS-norm streams (LLaMA, Qwen2, "
                    "Mistral, Gemma). Use stream='rotate' for this model.")
            self._fac = _linalg.factorize_gram(np.array(total), n_samples=self.n_samples)
            self.errors = self._fac.errors
        else:
            raise ValueError(f"stream must be 'rotate' or 'select'; got {how!r}")

    @property
    def width(self) -> int:
        return self.stream.width

    def select(self, k: int) -> StreamSelection:
        """The rewrite at width ``k`` (1 ≤ k ≤ d; 2 ≤ k for LayerNorm streams)."""
        d = self.width
        k = int(min(max(k, 2 if self.stream.form == "layer" else 1), d))
        scale = math.sqrt(d / k)
        if self.how == "select":
            keep, _ = self._fac.select(k)
            write = np.zeros((k, d))
            write[np.arange(k), keep] = 1.0
            reads, scales = [], []
            for gram in self.grams:
                reads.append(_least_squares(gram, keep))
                # the norm divides by the RMS over the kept coordinates: one constant per norm
                kept = np.trace(gram[np.ix_(keep, keep)]) / max(np.trace(gram), 1e-300)
                scales.append(1.0 / math.sqrt(max(kept * d / k, 1e-300)))
            write, reads = torch.from_numpy(write), tuple(torch.from_numpy(t) for t in reads)
            return StreamSelection(self.stream, write, reads, tuple(scales),
                                   float(self.errors[k]), "select")
        if self.stream.form == "layer":  # k - 1 directions in the zero-sum subspace of R^k
            kept, into = k - 1, helmert(k)
            ones = np.outer(np.ones(k) / math.sqrt(k), np.ones(d) / math.sqrt(d))
        else:
            kept, into, ones = k, np.eye(k), 0.0
        write = into @ self.basis[:, :kept].T
        if self.least_squares:
            # each norm's readers: the least-squares map from the kept directions of what that
            # norm sees, rather than the plain projection (better on every width measured)
            reads = tuple(into @ _least_squares(self.basis.T @ g @ self.basis,
                                                np.arange(kept)) @ self.basis.T + ones
                          for g in self.grams)
        else:
            reads = (write + ones,) * len(self.grams)
        as_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
        return StreamSelection(self.stream, as_tensor(write), tuple(map(as_tensor, reads)),
                               (scale,) * len(self.grams), float(self.errors[k]), "rotate")


def rotation_selection(stream: Stream, seed: int = 0) -> StreamSelection:
    """A random full-width rewrite of the stream (the check that the description is right)."""
    d = stream.width
    if stream.form == "layer":
        H = torch.from_numpy(helmert(d))
        Q = random_rotation(d - 1, seed)
        write = H @ Q @ H.T  # a rotation of the zero-sum subspace
        read = write + torch.full((d, d), 1.0 / d, dtype=torch.float64)
    else:
        write = read = random_rotation(d, seed)
    return StreamSelection(stream, write, (read,) * len(stream.norms), (1.0,) * len(stream.norms),
                           0.0, "rotate")


def check_stream(model: nn.Module, stream: Stream, example) -> str | None:
    """None if a random full-width rotation of the stream keeps ``model``'s outputs on
    ``example`` (``(args, kwargs)``), else the reason to leave the stream alone."""
    from ._surgery import sharing_copy

    args, kwargs = example
    trial = sharing_copy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the untying warning belongs to the real rewrite
        apply_stream_selection(trial, rotation_selection(stream))
    with torch.no_grad():
        before = first_tensor(run_model(model, args, kwargs)).double()
        after = first_tensor(run_model(trial, args, kwargs)).double()
    if before.shape == after.shape:
        # rounding of a rotated model against a wrong description (an error of order 1)
        tol = {torch.float64: 1e-8, torch.float32: 1e-3}.get(model_device_dtype(model)[1], 5e-2)
        scale = float(before.norm()) or 1.0
        if float((after - before).norm()) <= tol * scale:
            return None
    return ("residual stream: rewriting the stream in another basis changes the model's "
            "outputs, so something reads or writes the stream that the layout does not "
            "describe (or the model outputs the stream itself, e.g. a last hidden state); "
            "its hidden size is left alone")


def helmert(n: int) -> np.ndarray:
    """An n × (n - 1) matrix with orthonormal columns orthogonal to the all-ones vector."""
    basis = np.zeros((n, n - 1))
    for j in range(1, n):
        basis[:j, j - 1] = 1.0 / math.sqrt(j * (j + 1))
        basis[j, j - 1] = -j / math.sqrt(j * (j + 1))
    return basis


def _least_squares(gram: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """``T`` (k, d) minimizing ``‖N − N_J T‖`` from ``NᵀN``; identity on ``J``."""
    G = gram[np.ix_(keep, keep)]
    rhs = gram[keep, :]
    try:
        T = scipy.linalg.solve(G, rhs, assume_a="pos")
    except (np.linalg.LinAlgError, scipy.linalg.LinAlgError):
        T = np.linalg.lstsq(G, rhs, rcond=None)[0]
    T[:, keep] = np.eye(len(keep))
    return T


# -------------------------------------------------------------------------------- surgery


def apply_stream_selection(model: nn.Module, selection: StreamSelection) -> nn.Module:
    """Rewrite ``model``'s stream in place (tensors are replaced, never written into)."""
    stream = selection.unit
    if stream.tied:  # the final norm's gain folds into the head, not into the embedding
        config = getattr(model, "config", None)
        if config is not None and hasattr(config, "tie_word_embeddings"):
            config.tie_word_embeddings = False
    write = selection.write
    for name in stream.writers:
        _write(model, name, write)
    for norm, read, scale in zip(stream.norms, selection.reads, selection.scales, strict=True):
        _norm_and_readers(model, norm, read, scale, stream.form)
    return model


def _write(model, name: str, M: torch.Tensor) -> None:
    """A writer's output ``y`` becomes ``M @ y`` (k, d)."""
    target = get(model, name)
    if isinstance(target, nn.Parameter):  # e.g. ViT's class token (..., d)
        owner, _, attr = name.rpartition(".")
        new = (target.detach().double() @ M.T.to(target.device)).to(target.dtype)
        _surgery.set_tensor(model.get_submodule(owner), attr, new.contiguous())
        return
    weight = target.weight.detach()
    M = M.to(weight.device)
    if isinstance(target, nn.Embedding):
        _surgery.set_tensor(target, "weight", _cast(weight.double() @ M.T, weight))
        target.embedding_dim = M.shape[0]
        return
    if isinstance(target, nn.Linear):
        _surgery.set_tensor(target, "weight", _cast(M @ weight.double(), weight))
        target.out_features = M.shape[0]
    elif isinstance(target, nn.modules.conv._ConvNd) and target.groups == 1:
        w = torch.einsum("kd,d...->k...", M, weight.double())
        _surgery.set_tensor(target, "weight", _cast(w, weight))
        target.out_channels = M.shape[0]
    elif hasattr(target, "nf"):  # HF Conv1D: y = x W + b, W (in, out)
        _surgery.set_tensor(target, "weight", _cast(weight.double() @ M.T, weight))
        target.nf = M.shape[0]
    else:
        raise TypeError(f"cannot rewrite the output of {name!r} ({type(target).__name__})")
    bias = getattr(target, "bias", None)
    if bias is not None:
        _surgery.set_tensor(target, "bias", _cast(M @ bias.detach().double(), bias))


def _norm_and_readers(model, norm, read: torch.Tensor, scale: float, form: str) -> None:
    """Fold the norm's gain (and LayerNorm's bias) into its readers, which read ``read``."""
    module = model.get_submodule(norm.name)
    weight = module.weight.detach()
    k = read.shape[0]
    gain = weight.double() + (1.0 if form == "rms_offset" else 0.0)
    bias = getattr(module, "bias", None)
    folded_bias = None
    if bias is not None and bool(torch.any(bias != 0)):
        if all(_has_bias(model.get_submodule(r)) for r in norm.readers):
            folded_bias = bias.detach()
        else:  # keep it in the norm, in the new coordinates: read @ (b / g)
            if bool(torch.any(gain == 0)):
                raise ValueError(
                    f"{norm.name}: a LayerNorm bias with a zero gain cannot be rewritten for "
                    "readers without a bias")
            # readers see read.T @ b': the b' closest to b / g (exact at full width)
            r = read.to(bias.device)
            new_bias = torch.linalg.solve(r @ r.T, r @ (bias.detach().double() / gain))
    for name in norm.readers:
        reader = model.get_submodule(name)
        if folded_bias is not None:
            with torch.no_grad():  # the reader's response to the bias: W b
                shift = reader(folded_bias.to(reader.weight.dtype)) - reader(
                    torch.zeros_like(folded_bias, dtype=reader.weight.dtype))
            _surgery.set_tensor(reader, "bias", (reader.bias.detach() + shift).contiguous())
        T = read.to(weight.device) * gain[None, :].to(read.device)
        _surgery.fold_in(reader, T)
    constant = torch.full((k,), scale, dtype=torch.float64, device=weight.device)
    if form == "rms_offset":
        constant = constant - 1.0
    _surgery.set_tensor(module, "weight", _cast(constant, weight))
    if bias is not None:
        value = torch.zeros(k, dtype=torch.float64, device=bias.device)
        if folded_bias is None and bool(torch.any(bias != 0)):
            value = new_bias
        _surgery.set_tensor(module, "bias", _cast(value, bias))
    if hasattr(module, "normalized_shape"):
        module.normalized_shape = (k,)


def _has_bias(module) -> bool:
    return isinstance(getattr(module, "bias", None), torch.Tensor)


def _cast(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return value.to(like.dtype).contiguous()
