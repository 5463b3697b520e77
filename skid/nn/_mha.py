"""``nn.MultiheadAttention`` with fewer heads: :class:`PrunedMultiheadAttention`.

``nn.MultiheadAttention`` requires ``num_heads * head_dim == embed_dim`` for the query (its
functional forward, its fast path and ``nn.TransformerEncoderLayer``'s fused kernel all derive
``head_dim`` as ``embed_dim // num_heads``), so fewer heads of the same ``head_dim`` cannot be
expressed in that class: ``kdim``/``vdim`` change only the key and value *inputs*, and the
separate projection weights are checked against ``(embed_dim, embed_dim)``. The subclass keeps
every parameter name, attribute and the call signature of ``nn.MultiheadAttention`` with
narrower projections (``in_proj_weight`` of ``3 * num_heads * head_dim`` rows, ``out_proj`` of
``num_heads * head_dim`` inputs) and computes the same attention with
``F.scaled_dot_product_attention``. It reports ``_qkv_same_embed_dim = False``, which makes
``nn.TransformerEncoderLayer`` and ``nn.TransformerEncoder`` take their standard path (calling
this forward) instead of a fused kernel that would assume ``embed_dim // num_heads``. It
``torch.save``s (by reference to this class) and ``torch.export``s.

During calibration every prunable ``nn.MultiheadAttention`` of the compressor's working copy is
turned into this class with all its heads (the same function; the output projection is then
called as a module, so its input — the heads — can be observed); blocks that keep all their
heads are turned back into ``nn.MultiheadAttention``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._surgery import register_surgery

__all__ = ["PRUNED_FORMS", "PrunedMultiheadAttention", "to_plain", "to_pruned"]


class PrunedMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose ``num_heads * head_dim`` may be less than ``embed_dim``.

    Made by :class:`skid.nn.NetworkCompressor` from an ``nn.MultiheadAttention`` whose heads
    it prunes (never constructed directly: the instance keeps the original's attributes, with
    ``num_heads`` counting the kept heads). ``forward`` takes and returns what
    ``nn.MultiheadAttention.forward`` does; attention weights, when asked for, are those of the
    kept heads (averaged over them by default). A 3-D ``attn_mask`` must have
    ``batch * num_heads`` (kept heads) entries.
    """

    @property
    def _qkv_same_embed_dim(self) -> bool:
        return False  # declines every fused path that derives head_dim from embed_dim

    @_qkv_same_embed_dim.setter
    def _qkv_same_embed_dim(self, value) -> None:
        pass  # nn.MultiheadAttention.__init__/__setstate__ set it; this class decides

    def _projections(self):
        if self.in_proj_weight is not None:
            weights = self.in_proj_weight.chunk(3)
        else:
            weights = (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)
        biases = (self.in_proj_bias.chunk(3) if self.in_proj_bias is not None
                  else (None, None, None))
        return weights, biases

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True,
                attn_mask=None, average_attn_weights=True, is_causal=False):
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint (as "
                               "nn.MultiheadAttention)")
        n, length, source = query.shape[0], query.shape[1], key.shape[1]
        h, d = self.num_heads, self.head_dim
        (wq, wk, wv), (bq, bk, bv) = self._projections()
        q = F.linear(query, wq, bq).view(n, length, h, d).transpose(1, 2)
        k = F.linear(key, wk, bk).view(n, source, h, d).transpose(1, 2)
        v = F.linear(value, wv, bv).view(n, source, h, d).transpose(1, 2)
        mask = self._additive_mask(attn_mask, key_padding_mask, n, q.dtype)
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q * d ** -0.5) @ k.transpose(-2, -1)
            scores = scores if mask is None else scores + mask
            weights = torch.softmax(scores, dim=-1)
            out = F.dropout(weights, dropout, self.training) @ v
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if unbatched:
                weights = weights.squeeze(0)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        out = self.out_proj(out.transpose(1, 2).reshape(n, length, h * d))
        if unbatched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def _additive_mask(self, attn_mask, key_padding_mask, n, dtype):
        """``attn_mask`` and ``key_padding_mask`` as one float mask broadcasting to
        ``(n, heads, length, source)`` (boolean True: not attended, as in the original)."""
        mask = None
        if attn_mask is not None:
            mask = _as_float(attn_mask, dtype)
            if mask.dim() == 3:
                if mask.shape[0] != n * self.num_heads:
                    raise ValueError(
                        f"a 3-D attn_mask must have batch * num_heads = {n * self.num_heads} "
                        f"entries for this pruned attention ({self.num_heads} heads kept); "
                        f"got {mask.shape[0]}")
                mask = mask.view(n, self.num_heads, *mask.shape[1:])
        if key_padding_mask is not None:
            padding = _as_float(key_padding_mask, dtype).view(n, 1, 1, -1)
            mask = padding if mask is None else mask + padding
        return mask


def _as_float(mask, dtype):
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            mask, float("-inf"))
    return mask.to(dtype)


def unsupported(module: nn.MultiheadAttention):
    """Why an ``nn.MultiheadAttention`` cannot lose heads, or None."""
    if module.bias_k is not None or module.add_zero_attn:
        return ("nn.MultiheadAttention with add_bias_kv or add_zero_attn (a learned key/value "
                "row per head) is not supported yet")
    return None


def to_pruned(module: nn.MultiheadAttention) -> None:
    """Make ``module`` a :class:`PrunedMultiheadAttention` in place (the same function)."""
    if not isinstance(module, PrunedMultiheadAttention):
        module.__dict__.pop("_qkv_same_embed_dim", None)
        module.__class__ = PrunedMultiheadAttention


def to_plain(module: nn.Module) -> None:
    """Turn a :class:`PrunedMultiheadAttention` that has all its heads back into
    ``nn.MultiheadAttention`` in place."""
    if type(module) is PrunedMultiheadAttention:
        module.__class__ = nn.MultiheadAttention
        module._qkv_same_embed_dim = module.in_proj_weight is not None


#: Class name → (the class it is made from, the conversion, its inverse): what
#: ``load_compressed`` may apply.
PRUNED_FORMS = {"PrunedMultiheadAttention": (nn.MultiheadAttention, to_pruned, to_plain)}


@register_surgery(PrunedMultiheadAttention)
class _PrunedMultiheadAttentionSurgery:
    """Its query, key and value rows as one producer of ``[q | k | v]`` (fused or not)."""

    def out_width(self, module):
        (wq, wk, wv), _ = module._projections()
        return wq.shape[0] + wk.shape[0] + wv.shape[0]

    def slice_out(self, module, keep):
        third = self.out_width(module) // 3
        if module.in_proj_weight is not None:
            module.in_proj_weight = _narrowed(module.in_proj_weight, keep)
        else:
            for i, name in enumerate(("q_proj_weight", "k_proj_weight", "v_proj_weight")):
                part = keep[(keep >= i * third) & (keep < (i + 1) * third)] - i * third
                setattr(module, name, _narrowed(getattr(module, name), part))
        if module.in_proj_bias is not None:
            module.in_proj_bias = _narrowed(module.in_proj_bias, keep)


def _narrowed(parameter, rows):
    return nn.Parameter(parameter.detach()[rows].clone(),
                        requires_grad=parameter.requires_grad)
