"""The Hugging Face ``config`` of the fit's working copy: no key/value cache while it is
calibrated, and the widths its modules have once it is compressed.

No pass of a fit reads a key/value cache: each batch runs from the first token, and a cache
only keeps the keys and values the attention has already used. :func:`switch_off_kv_cache`
turns ``use_cache`` off in the copy's configs, so its decoders build none (on the benchmark
LLaMA 5 % of a forward pass; on an LLM, every calibration batch's keys and values of every
layer, held until the batch ends); :func:`switch_on_kv_cache` gives the compressed model the
setting back.

After a fit, ``compressed_model_.config`` says what the model is where the config can say it:
the stream's width (``hidden_size``, with an explicit ``head_dim``, which the LLaMA family
otherwise derives from it) always, the MLP width (``intermediate_size``) and the head counts
(``num_attention_heads``, ``num_key_value_heads``) when every block has the same one (what
``uniform=True`` ensures). With ``uniform=True`` the config is then checked by building the
model from it on the meta device: if a parameter's shape differs from the compressed model's,
``save_pretrained`` would not reload it, and a warning says so (use ``save_compressed``).
"""

from __future__ import annotations

import copy
import math
import warnings

import torch

__all__ = ["switch_off_kv_cache", "switch_on_kv_cache", "update"]

#: The config field of a layer's MLP width, by ``model_type`` (the default: ``intermediate_size``).
_MLP_FIELD = {"gpt2": "n_inner"}


def switch_off_kv_cache(model) -> list:
    """Set ``use_cache=False`` in every config of ``model``'s modules that has it on (a config
    that refuses the change, e.g. a frozen dataclass, is left as it is); returns the configs
    it changed."""
    configs = {id(c): c for module in model.modules()
               if getattr(c := getattr(module, "config", None), "use_cache", None) is True}
    changed = []
    for config in configs.values():
        try:
            config.use_cache = False
        except (AttributeError, TypeError):
            continue
        changed.append(config)
    return changed


def switch_on_kv_cache(configs) -> None:
    """Undo :func:`switch_off_kv_cache` for the configs it returned."""
    for config in configs:
        config.use_cache = True


def update(model, plan, *, uniform: bool) -> None:
    """Write the compressed widths into ``model.config`` (the fit's own copy) in place."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return
    layers = getattr(config, "num_hidden_layers", None)
    by_kind = {}
    for selection in plan:
        by_kind.setdefault(selection.unit.kind, []).append(selection)
    for selection in by_kind.get("residual", []):
        _stream(model, config, selection, uniform)
    channels = by_kind.get("channels", [])
    mlp_field = _MLP_FIELD.get(getattr(config, "model_type", None), "intermediate_size")
    full = getattr(config, mlp_field, None)
    mlps = [s for s in channels if s.unit.width == full]
    if full is not None and mlps and len(mlps) == layers:
        kept = {int(s.keep.numel()) for s in mlps}
        if len(kept) == 1:
            setattr(config, mlp_field, kept.pop())
    heads = by_kind.get("heads", [])
    if heads and len(heads) == layers:
        counts = {(int(s.heads.size), int(s.kv_heads.size if s.unit.group_size > 1
                                          else s.heads.size)) for s in heads}
        if len(counts) == 1:
            n_heads, n_kv = counts.pop()
            _explicit_head_dim(config)
            config.num_attention_heads = n_heads
            if hasattr(config, "num_key_value_heads"):
                config.num_key_value_heads = n_kv
    if uniform:
        _check(model, config)


def _stream(model, config, selection, uniform: bool) -> None:
    stream = selection.unit
    field = stream.config_field
    if field is None or not hasattr(config, field):
        return
    before, after = int(getattr(config, field)), selection.width
    _explicit_head_dim(config)
    setattr(config, field, after)
    embedding = model.get_submodule(stream.writers[0])
    scale = getattr(embedding, "scalar_embed_scale", None)
    if uniform and scale is not None and after != before and math.isclose(
            scale, math.sqrt(before)):
        # Gemma's embedding multiplies by sqrt(hidden_size), a buffer fixed when the model is
        # built and never saved: a model built from this config multiplies by sqrt(after), so
        # the weight carries the difference (then only save_pretrained reloads it; without
        # uniform the scale stays and only save_compressed, which builds the original, does)
        new_scale = math.sqrt(after)
        weight = embedding.weight.detach()
        embedding.weight = torch.nn.Parameter(
            (weight.double() * (scale / new_scale)).to(weight.dtype),
            requires_grad=embedding.weight.requires_grad)
        embedding.scalar_embed_scale = new_scale
        embedding.embed_scale = torch.full_like(embedding.embed_scale, new_scale)


def _explicit_head_dim(config) -> None:
    """Write ``head_dim`` into the config where it was derived from the hidden size."""
    heads = getattr(config, "num_attention_heads", None)
    if heads and hasattr(config, "hidden_size") and getattr(config, "head_dim", None) is None:
        if getattr(config, "model_type", None) not in ("gpt2", "vit", "bert"):
            config.head_dim = config.hidden_size // heads


def _check(model, config) -> None:
    """Warn when a model built from ``config`` would not have the compressed model's shapes."""
    try:
        with torch.device("meta"):
            fresh = type(model)(copy.deepcopy(config))
    except Exception as exc:  # the config itself is inconsistent for this class
        _warn(f"{type(model).__name__} cannot be built from the updated config: "
              f"{type(exc).__name__}: {exc}")
        return
    shapes = {n: tuple(t.shape) for n, t in fresh.state_dict().items()}
    wrong = [f"{n}: {tuple(t.shape)} (config gives {shapes.get(n)})"
             for n, t in model.state_dict().items() if shapes.get(n) != tuple(t.shape)]
    if wrong:
        _warn("the config cannot describe these widths: " + "; ".join(wrong[:3]) +
              ("; ..." if len(wrong) > 3 else ""))


def _warn(what: str) -> None:
    warnings.warn(
        f"uniform=True: save_pretrained of the compressed model would not reload: {what}. "
        "Save it with skid.nn.save_compressed (per-module widths) instead.",
        UserWarning, stacklevel=4)
