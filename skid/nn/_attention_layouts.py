"""Attention layouts: where each family keeps its projections and its per-head tensors.

:func:`attention_layout` asks the recognisers of ``LAYOUTS`` in turn; each returns an
:class:`AttentionLayout`, a reason string (an attention block whose heads cannot be pruned),
or None (not its family). Named layouts are rows of ``_NAMED`` (separate query, key, value and
output projections), the fused ones functions (one module's output is ``[q | k | v]``):

============================  =================================================================
HF LLaMA/Qwen2/Mistral/ViT    ``q_proj k_proj v_proj o_proj``, ``head_dim``
HF BART/Marian/Whisper/CLIP   ``q_proj k_proj v_proj out_proj``, ``head_dim`` (encoder, decoder
                              and cross-attention: keys and values from another sequence are
                              still one head each)
HF BERT/RoBERTa               ``self.query self.key self.value output.dense``
HF DistilBERT                 ``q_lin k_lin v_lin out_lin``, ``attention_head_size``
HF GPT-2                      ``c_attn`` (Conv1D) → ``c_proj``
timm ``Attention``, Swin      ``qkv`` → ``proj``, ``num_heads``; Swin's
``WindowAttention``           ``relative_position_bias_table`` columns, Swin-V2's
                              ``logit_scale``, ``cpb_mlp`` outputs and ``q/k/v_bias`` follow
``nn.MultiheadAttention``     ``in_proj_weight`` → ``out_proj``, as
                              :class:`~skid.nn._mha.PrunedMultiheadAttention`
============================  =================================================================

Skipped with their reason: T5 (a relative position bias computed once and shared by later
layers), torchvision's Swin (its functional attention derives ``head_dim`` from the input
width), q/k/v of unequal widths per head (EfficientFormer/LeViT ``key_dim``), a norm over all
heads before the output projection (timm ``scale_norm``), GPT-2 cross-attention.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from . import _mha

__all__ = ["LAYOUTS", "AttentionLayout", "PerHead", "attention_layout"]


@dataclass(frozen=True)
class PerHead:
    """A tensor or module of the block holding one entry per head along ``axis`` (or
    ``head_dim`` entries per head, when ``rows``); a module (a Linear whose outputs are one per
    head) loses the output channels of the dropped heads."""

    name: str
    axis: int = 0
    rows: bool = False


@dataclass(frozen=True)
class AttentionLayout:
    """Where an attention family keeps its projections (names relative to the block).

    ``fused``: queries, keys and values are the three equal thirds of one module's output
    (GPT-2's ``c_attn``, timm's ``qkv``); ``holder`` is the submodule whose attributes hold the
    head counts ("" is the block itself, as is a projection named ""); ``per_head`` lists the
    tensors that follow the kept heads; ``form`` names a class the block takes while its heads
    are pruned (``"mha"``: :class:`~skid.nn._mha.PrunedMultiheadAttention`).
    """

    queries: str
    keys: str
    values: str
    output: str
    head_dim: int
    holder: str = ""
    fused: bool = False
    per_head: tuple = ()
    form: str = ""


def _int_attr(module, name):
    value = getattr(module, name, None)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _get(module, path):
    for part in path.split(".") if path else ():
        module = getattr(module, part, None)
    return module


def _linear_children(module, *names):
    return all(isinstance(_get(module, n), nn.Linear) for n in names)


@dataclass(frozen=True)
class _Named:
    """A family with separate query/key/value/output ``nn.Linear`` projections."""

    queries: str
    keys: str
    values: str
    output: str
    head_dim: str  # the attribute of ``holder`` holding the head size
    holder: str = ""

    def __call__(self, module):
        holder = _get(module, self.holder)
        head_dim = _int_attr(holder, self.head_dim) if holder is not None else None
        if head_dim and _linear_children(module, self.queries, self.keys, self.values,
                                         self.output):
            return AttentionLayout(self.queries, self.keys, self.values, self.output, head_dim,
                                   holder=self.holder)
        return None


_NAMED = (
    _Named("q_proj", "k_proj", "v_proj", "o_proj", "head_dim"),  # LLaMA, Qwen2, Mistral, ViT
    _Named("q_proj", "k_proj", "v_proj", "out_proj", "head_dim"),  # BART, Whisper, CLIP
    _Named("q_lin", "k_lin", "v_lin", "out_lin", "attention_head_size"),  # DistilBERT
    _Named("self.query", "self.key", "self.value", "output.dense", "attention_head_size",
           holder="self"),  # BERT, RoBERTa
)


def _gpt2(module):
    """GPT-2: q, k, v fused in ``c_attn`` (HF ``Conv1D``), output ``c_proj``."""
    c_attn, c_proj = getattr(module, "c_attn", None), getattr(module, "c_proj", None)
    if type(c_attn).__name__ != "Conv1D" or type(c_proj).__name__ != "Conv1D":
        return None
    if getattr(module, "is_cross_attention", False):
        return "cross-attention (keys and values from another sequence) is not supported yet"
    head_dim = _int_attr(module, "head_dim")
    if head_dim and _int_attr(module, "split_size"):
        return AttentionLayout("c_attn", "c_attn", "c_attn", "c_proj", head_dim, fused=True)
    return None


#: Tensors of a fused-``qkv`` block that follow its heads (timm Swin, Swin-V2).
_PER_HEAD = {
    "relative_position_bias_table": PerHead("relative_position_bias_table", axis=1),
    "logit_scale": PerHead("logit_scale"),
    "q_bias": PerHead("q_bias", rows=True),
    "k_bias": PerHead("k_bias", rows=True),
    "v_bias": PerHead("v_bias", rows=True),
}
#: Tensors of such a block that do not depend on the head count.
_HEADLESS = {"relative_position_index", "relative_coords_table"}
_TORCHVISION_SWIN = {"ShiftedWindowAttention", "ShiftedWindowAttentionV2"}


def _fused_qkv(module):
    """timm ``Attention`` and Swin ``WindowAttention``: ``qkv`` → ``[q | k | v]`` → ``proj``."""
    qkv, proj = getattr(module, "qkv", None), getattr(module, "proj", None)
    heads = _int_attr(module, "num_heads")
    if not (isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear) and heads):
        return None
    if type(module).__name__ in _TORCHVISION_SWIN:
        return ("torchvision's shifted_window_attention derives head_dim from the input width "
                "(C // num_heads), so fewer heads cannot run in the same module")
    if _int_attr(module, "key_dim") is not None:
        return ("queries, keys and values of unequal widths interleaved per head "
                "(EfficientFormer/LeViT-style key_dim) are not supported yet")
    if not isinstance(getattr(module, "norm", None), (nn.Identity, type(None))):
        return ("a norm over all heads before the output projection (scale_norm) mixes the "
                "heads; not supported")
    head_dim = _int_attr(module, "head_dim") or proj.in_features // heads
    if qkv.out_features != 3 * proj.in_features or proj.in_features != heads * head_dim:
        return (f"qkv ({qkv.out_features} outputs) is not three blocks of {heads} heads of "
                f"{head_dim}")
    per_head = []
    for name, tensor in (*module._parameters.items(), *module._buffers.items()):
        if tensor is None or name in _HEADLESS or not tensor.is_floating_point():
            continue
        if name not in _PER_HEAD:
            if heads in tensor.shape or heads * head_dim in tensor.shape:
                return (f"its tensor {name!r} of shape {tuple(tensor.shape)} may hold one entry "
                        "per head and is not a known per-head tensor")
            continue
        per_head.append(_PER_HEAD[name])
    cpb = getattr(module, "cpb_mlp", None)  # Swin-V2: a continuous bias, one output per head
    if isinstance(cpb, nn.Sequential) and isinstance(cpb[-1], nn.Linear):
        if cpb[-1].out_features != heads:
            return f"cpb_mlp has {cpb[-1].out_features} outputs for {heads} heads"
        per_head.append(PerHead(f"cpb_mlp.{len(cpb) - 1}"))
    return AttentionLayout("qkv", "qkv", "qkv", "proj", head_dim, fused=True,
                           per_head=tuple(per_head))


def _multihead(module):
    """``nn.MultiheadAttention``: ``in_proj_weight`` (or ``q/k/v_proj_weight``) →
    ``out_proj``, pruned as :class:`~skid.nn._mha.PrunedMultiheadAttention`."""
    if not isinstance(module, nn.MultiheadAttention):
        return None
    reason = _mha.unsupported(module)
    if reason:
        return reason
    return AttentionLayout("", "", "", "out_proj", module.head_dim, fused=True, form="mha")


def _unsupported(module):
    if hasattr(module, "relative_attention_bias") or hasattr(
        module, "has_relative_attention_bias"
    ):
        return ("a relative position bias computed once and shared by later layers (T5) "
                "fixes the head count; not supported yet")
    return None


LAYOUTS = (_unsupported, _multihead, *_NAMED, _gpt2, _fused_qkv)

#: ``form`` → (make the block that class, turn it back once it keeps all its heads).
FORMS = {"mha": (_mha.to_pruned, _mha.to_plain)}


def attention_layout(module: nn.Module):
    """The module's :class:`AttentionLayout`, a reason string if it is an attention block whose
    heads cannot be pruned, or None when it is not an attention block."""
    if next(module.children(), None) is None:  # the others read projections that are children
        return _unsupported(module)
    for recognise in LAYOUTS:
        found = recognise(module)
        if found is not None:
            return found
    return None
