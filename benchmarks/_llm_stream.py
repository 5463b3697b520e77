"""The residual stream of the stdlib-trained LLaMA (``_llm.py``): hidden size pruned.

Table 1, hidden size kept at 87.5 / 75 / 62.5 / 50 %, every other width whole:

- rotation + per-reader T: ``prune="residual"`` (one orthogonal basis of the normalized
  stream — one Gram per reading norm, summed at unit weight per token — sliced, and each norm's
  readers get the least-squares map from the kept directions; the default);
- rotation, projection: the same basis, readers reading the plain projection;
- rotation, gain-weighted Grams: the projection with each norm's Gram weighted by its gain,
  ``diag(g) G diag(g)`` (what its readers see), for the basis;
- joint ID + per-reader T: ``stream="select"`` (kept stream coordinates, a least-squares T and
  an RMS constant per norm);
- joint ID, same J, no T: those coordinates, readers just dropping the rest.

Table 2, the stream with the other axes under one FLOP budget against MLP + heads alone, and a
SliceGPT-style re-implementation (``_slicegpt.py``: a rotation per position, shortcut matrices
counted) at the layer parameters of the combined axes.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from _llm import HIDDEN, SEQ, trained, windows
from _slicegpt import layer_params as slicegpt_params
from _slicegpt import slicegpt

from skid import NetworkCompressor
from skid.nn import _residual
from skid.nn._calibration import Batches, example_inputs
from skid.nn._flops import count_flops
from skid.nn._rotation import StreamFactorization, StreamSelection, apply_stream_selection

KEPT = (0.875, 0.75, 0.625, 0.5)
BUDGETS = (0.8, 0.65, 0.5)


def _perplexity(model, test):
    from _llm import perplexity

    return perplexity(model, test)


def _rewritten(model, selection) -> torch.nn.Module:
    small = copy.deepcopy(model)
    apply_stream_selection(small, selection)
    return small


def stream_table(steps: int, n_calib: int, n_test: int, kept=KEPT) -> list:
    """Rows (method, hidden kept, FLOPs kept, perplexity, ratio)."""
    model, train, held_out = trained(steps)
    calib = {"input_ids": windows(train, n_calib, seed=1)[:, :-1]}
    test = windows(held_out, n_test, seed=2)
    base = _perplexity(model, test)
    work = copy.deepcopy(model)
    (stream,), _ = _residual.find(work, example_inputs(calib, "cpu", torch.float32))
    rotate = _residual.factorize(work, stream, Batches(calib, 32), "rotate")
    select = _residual.factorize(work, stream, Batches(calib, 32), "select")
    gains = [model.get_submodule(n.name).weight.detach().double().numpy() for n in stream.norms]
    weighted = StreamFactorization(stream, [g[:, None] * G * g[None, :]
                                            for g, G in zip(gains, rotate.grams, strict=True)],
                                   rotate.counts)
    weighted.least_squares = False
    projected = copy.copy(rotate)
    projected.least_squares = False
    rows = [("original", HIDDEN, 1.0, base, 1.0)]
    for fraction in kept:
        k = round(fraction * HIDDEN)
        nc = NetworkCompressor(model, rank=fraction, prune="residual", batch_size=32).fit(calib)
        flops = nc.flops_["after"] / nc.flops_["before"]
        joint = select.select(k)
        no_t = StreamSelection(stream, joint.write, (joint.write,) * len(stream.norms),
                               joint.scales, joint.error, "select")
        for name, candidate in (
            ("rotation + per-reader T", nc.compressed_model_),
            ("rotation, projection", _rewritten(model, projected.select(k))),
            ("rotation, gain-weighted Grams", _rewritten(model, weighted.select(k))),
            ("joint ID + per-reader T", _rewritten(model, joint)),
            ("joint ID, same J, no T", _rewritten(model, no_t)),
        ):
            value = _perplexity(candidate, test)
            rows.append((name, k, flops, value, value / base))
    return rows


def _layer_params(model) -> int:
    """Parameters of the blocks (embeddings, final norm and output head left out)."""
    return sum(p.numel() for p in model.model.layers.parameters())


def combined_table(steps: int, n_calib: int, n_test: int, budgets=BUDGETS) -> list:
    """Rows (budget, axes, hidden, FLOPs kept, layer params kept, perplexity, ratio)."""
    model, train, held_out = trained(steps)
    calib = {"input_ids": windows(train, n_calib, seed=1)[:, :-1]}
    test = windows(held_out, n_test, seed=2)
    base = _perplexity(model, test)
    layers = _layer_params(model)
    rows = [("-", "original", HIDDEN, 1.0, 1.0, base, 1.0)]
    axes = (("MLP + heads", dict(prune=("channels", "heads"))),
            ("stream only", dict(prune="residual")),
            ("stream + MLP + heads", dict(prune=("channels", "heads", "residual"))),
            ("stream + MLP + heads, uniform", dict(prune=("channels", "heads", "residual"),
                                                   uniform=True)))
    work = copy.deepcopy(model)
    example = example_inputs(calib, "cpu", torch.float32)
    (stream,), _ = _residual.find(work, example)
    grams = _residual.factorize(work, stream, Batches(calib, 32), "rotate").grams
    flops_before = count_flops(model, *example)[0]
    for budget in budgets:
        for label, params in axes:
            nc = NetworkCompressor(model, target_flops=budget, batch_size=32,
                                   **params).fit(calib)
            small = nc.compressed_model_
            value = _perplexity(small, test)
            kept = _layer_params(small) / layers
            rows.append((f"{budget:.2f}", label, int(small.config.hidden_size),
                         nc.flops_["after"] / nc.flops_["before"], kept, value, value / base))
        # SliceGPT-style at the layer parameters of the last row (the combined axes), its
        # shortcut matrices counted: the widest slice within them
        for k in range(HIDDEN, 0, -1):
            sliced = slicegpt(model, stream, grams, k)
            if slicegpt_params(sliced) / layers <= kept:
                break
        shortcut_flops = 4 * SEQ * k * k * len(model.model.layers)  # 2 (k × k) per layer
        flops = (count_flops(sliced, *example)[0] + shortcut_flops) / flops_before
        value = _perplexity(sliced, test)
        rows.append((f"{budget:.2f}", "SliceGPT-style (per-position Q, shortcuts)", k, flops,
                     slicegpt_params(sliced) / layers, value, value / base))
    return rows


def stream_rank(steps: int, n_calib: int) -> dict:
    """How low-rank the stream is: hidden directions for 1 %, 5 %, 10 % relative error."""
    model, train, _ = trained(steps)
    calib = {"input_ids": windows(train, n_calib, seed=1)[:, :-1]}
    work = copy.deepcopy(model)
    (stream,), _ = _residual.find(work, example_inputs(calib, "cpu", torch.float32))
    errors = _residual.factorize(work, stream, Batches(calib, 32), "rotate").errors
    return {tol: int(np.argmax(errors <= tol)) for tol in (0.01, 0.05, 0.1)}
