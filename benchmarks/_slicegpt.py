"""A SliceGPT-style baseline for the stdlib LLaMA (``_llm.py``): one rotation per position.

SliceGPT (Ashkboos et al., ICLR 2024) folds the RMSNorm gains into the readers and rotates the
stream by the principal directions *of each position's own input* — one ``Q_p`` per norm —
then slices every ``Q_p`` to ``k`` columns. Since the basis changes from one position to the
next, every residual add needs a shortcut matrix ``Q_pᵀ Q_{p+1}`` (k × k) that carries the
stream into the next basis; those matrices are counted in the parameters here. Re-implemented
on skid's own statistics (one Gram of the normalized stream per norm, from the original model,
not SliceGPT's sequential recalibration) and surgery; readers read the plain projection.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
from torch import nn

from skid.nn._rotation import _norm_and_readers, _write


class _ShortcutLayer(nn.Module):
    """A LLaMA decoder layer whose two residual adds carry the stream into the next basis."""

    def __init__(self, layer, attention_shortcut, mlp_shortcut):
        super().__init__()
        self.layer = layer
        self.register_buffer("attention_shortcut", attention_shortcut)
        self.register_buffer("mlp_shortcut", mlp_shortcut)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None,
                use_cache=False, position_embeddings=None, **kwargs):
        layer = self.layer
        residual = hidden_states @ self.attention_shortcut
        hidden_states, _ = layer.self_attn(
            hidden_states=layer.input_layernorm(hidden_states), attention_mask=attention_mask,
            position_ids=position_ids, cache=cache, use_cache=use_cache,
            position_embeddings=position_embeddings, **kwargs)
        hidden_states = residual + hidden_states
        residual = hidden_states @ self.mlp_shortcut
        return residual + layer.mlp(layer.post_attention_layernorm(hidden_states))


def slicegpt(model, stream, grams, k: int) -> nn.Module:
    """The model with every position's stream in its own principal basis, sliced to ``k``."""
    d = stream.width
    bases = []
    for gram in grams:  # one per norm, in forward order: attention, MLP, ..., final
        values, vectors = np.linalg.eigh(gram)
        bases.append(torch.from_numpy(np.ascontiguousarray(vectors[:, ::-1][:, :k])))
    small = copy.deepcopy(model)
    layers = small.model.layers
    _write(small, stream.writers[0], bases[0].T)  # the embedding writes position 0
    for i, norm in enumerate(stream.norms):
        _norm_and_readers(small, norm, bases[i].T, math.sqrt(d / k), stream.form)
    for layer_index in range(len(layers)):
        attention, mlp, after = (bases[2 * layer_index], bases[2 * layer_index + 1],
                                 bases[2 * layer_index + 2])
        prefix = f"model.layers.{layer_index}."
        _write(small, prefix + "self_attn.o_proj", mlp.T)
        _write(small, prefix + "mlp.down_proj", after.T)
        dtype = layers[layer_index].self_attn.o_proj.weight.dtype
        layers[layer_index] = _ShortcutLayer(layers[layer_index],
                                             (attention.T @ mlp).to(dtype),
                                             (mlp.T @ after).to(dtype))
    small.config.hidden_size = k
    return small


def layer_params(model) -> int:
    """Parameters and shortcut matrices of the blocks."""
    layers = model.model.layers
    return (sum(p.numel() for p in layers.parameters())
            + sum(b.numel() for b in layers.buffers() if b.dtype.is_floating_point
                  and b.ndim == 2))
