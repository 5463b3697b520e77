"""Attention layouts beyond the first HF families: timm's fused ``qkv`` (ViT, Swin, Swin-V2),
``nn.MultiheadAttention`` (torchvision ViT, ``nn.TransformerEncoder``), DistilBERT, BART,
Marian, Whisper and CLIP; and the blocks left alone, with their reason."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from skid.nn import NetworkCompressor
from skid.nn._head_discovery import find_heads
from skid.nn._mha import PrunedMultiheadAttention

from .blocks import ATTENTION_BLOCKS, make_block

transformers = pytest.importorskip("transformers")

from .hf_attention import HF_ATTENTION  # noqa: E402


def _block_case(name):
    factory, make_input, pattern, _ = ATTENTION_BLOCKS[name]
    return (lambda: make_block(name), lambda n=8, seed=0: make_input(n, seed),
            tuple(pattern.format(i) for i in range(2)))


def _hf_case(name):
    factory, make_input, blocks = HF_ATTENTION[name]

    def build():
        torch.manual_seed(0)
        return factory().eval()

    return build, make_input, blocks


CASES = {**{n: _block_case(n) for n, e in ATTENTION_BLOCKS.items() if e[3]},
         **{f"hf_{n}": _hf_case(n) for n in HF_ATTENTION}}
SKIPPED = {
    "timm_swin_v2": "does not run with fewer heads",
    "torchvision_swin": "derives head_dim from the input width",
}


def _run(model, X):
    with torch.no_grad():
        out = model(**X) if isinstance(X, dict) else model(X)
    while not isinstance(out, torch.Tensor):
        out = out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state
    return out


def _split(X):
    return ((), X) if isinstance(X, dict) else ((X,), {})


def _fit(name, n=16, **params):
    build, make_input, blocks = CASES[name]
    model = build()
    X = make_input(n)
    return model, X, NetworkCompressor(model, **params).fit(X), blocks


@pytest.mark.parametrize("name", sorted(CASES))
def test_heads_are_found_in_forward_order(name):
    build, make_input, blocks = CASES[name]
    units, skipped = find_heads(build(), *_split(make_input(2)))
    assert tuple(u.attention for u in units) == blocks
    assert all(u.n_heads == 4 for u in units)
    assert not [s for s in skipped if "attention" in s.reason]


@pytest.mark.parametrize("name", sorted(SKIPPED))
def test_blocks_whose_code_fixes_the_head_count_are_skipped_with_the_reason(name):
    model = make_block(name)
    units, skipped = find_heads(model, (ATTENTION_BLOCKS[name][1](2),), {})
    assert not units
    assert len(skipped) == 2 and all(SKIPPED[name] in s.reason for s in skipped)
    nc = NetworkCompressor(model, rank=0.5).fit(ATTENTION_BLOCKS[name][1](8))
    assert {r["kind"] for r in nc.layers_} == {"channels"}  # the model still compresses
    assert sum(SKIPPED[name] in s["reason"] for s in nc.skipped_) == 2


@pytest.mark.parametrize("prune", [("heads",), ("channels", "heads")])
@pytest.mark.parametrize("name", sorted(CASES))
def test_full_rank_reproduces_the_model(name, prune):
    model, X, nc, _ = _fit(name, n=32, rank=1.0, tol=0, prune=prune)
    torch.testing.assert_close(_run(nc.compressed_model_, X), _run(model, X), atol=1e-5,
                               rtol=1e-5)
    assert not any(isinstance(m, PrunedMultiheadAttention)
                   for m in nc.compressed_model_.modules())  # all heads kept: the plain class


def _heads_of(block):
    for attribute in ("num_heads", "n_heads"):
        if isinstance(getattr(block, attribute, None), int):
            return getattr(block, attribute)
    raise AssertionError(f"{type(block).__name__} has no head count")


@pytest.mark.parametrize("name", sorted(CASES))
def test_half_the_heads_are_pruned_and_the_model_runs(name):
    model, X, nc, blocks = _fit(name, rank=0.5, prune="heads")
    rows = [r for r in nc.layers_ if r["kind"] == "heads"]
    assert [r["attention"] for r in rows] == list(blocks)
    assert all((r["width_before"], r["width_after"]) == (4, 2) for r in rows)
    assert 0 < nc.flops_["after"] < nc.flops_["before"]
    small = nc.compressed_model_
    for name_ in blocks:
        block, original = small.get_submodule(name_), model.get_submodule(name_)
        assert _heads_of(block) == 2 and _heads_of(original) == 4  # the original is untouched
    assert _run(small, X).shape == _run(model, X).shape
    assert torch.isfinite(_run(small, X)).all()


def test_per_head_tensors_follow_the_kept_heads():
    """Swin's bias table columns; Swin-V2's logit_scale, cpb_mlp outputs and q/k/v biases."""
    for name, tensors in (("timm_swin", {"relative_position_bias_table": (1, 1)}),
                          ("swin_v2_reshape_any", {"logit_scale": (0, 1), "q_bias": (0, 4),
                                                   "k_bias": (0, 4), "v_bias": (0, 4),
                                                   "cpb_mlp.2.weight": (0, 1)})):
        model, X, nc, blocks = _fit(name, rank=0.5, prune="heads")
        for row in nc.layers_:
            block = nc.compressed_model_.get_submodule(row["attention"])
            original = model.get_submodule(row["attention"])
            heads = [int(h) for h in nc.plan_.selections[nc.layers_.index(row)].heads]
            for tensor, (axis, per_head) in tensors.items():
                kept = np.concatenate([np.arange(h * per_head, (h + 1) * per_head)
                                       for h in heads])
                before = original.get_parameter(tensor) if "." in tensor else getattr(
                    original, tensor)
                after = block.get_parameter(tensor) if "." in tensor else getattr(block, tensor)
                torch.testing.assert_close(after, before.index_select(axis,
                                                                      torch.as_tensor(kept)))


def test_save_and_reload_every_layout(tmp_path):
    pytest.importorskip("safetensors")
    from skid.nn import load_compressed, save_compressed

    for name in sorted(CASES):
        model, X, nc, _ = _fit(name, rank=0.5)
        save_compressed(nc, tmp_path / name)
        fresh = CASES[name][0]()
        if name == "swin_v2_reshape_any":  # its zero ``k_bias`` is a non-persistent buffer
            with pytest.raises(ValueError, match="non-persistent buffer"):
                load_compressed(fresh, tmp_path / name)
            continue
        fresh = load_compressed(fresh, tmp_path / name)
        torch.testing.assert_close(_run(fresh, X), _run(nc.compressed_model_, X), msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_pruned_layouts_export(name):
    _, X, nc, _ = _fit(name, rank=0.5)
    args, kwargs = _split({k: v[:2] for k, v in X.items()} if isinstance(X, dict) else X[:2])
    if name in ("hf_bart", "hf_marian", "hf_whisper"):
        kwargs["use_cache"] = False
    exported = torch.export.export(nc.compressed_model_, args, kwargs=kwargs)
    with torch.no_grad():
        a = exported.module()(*args, **kwargs)
        b = nc.compressed_model_(*args, **kwargs)
    torch.testing.assert_close(_run(lambda **_: a, {}), _run(lambda **_: b, {}))


# ------------------------------------------------------------------ nn.MultiheadAttention


def _pruned_copy(mha):
    from skid.nn._mha import to_pruned

    pruned = copy.deepcopy(mha)
    to_pruned(pruned)
    return pruned


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kdim", [None, 12])
def test_pruned_multihead_attention_computes_what_multihead_attention_does(batch_first, kdim):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first, kdim=kdim, vdim=kdim).eval()
    pruned = _pruned_copy(mha)
    q, k = torch.randn(3, 5, 16), torch.randn(3, 7, kdim or 16)
    if not batch_first:
        q, k = q.transpose(0, 1), k.transpose(0, 1)
    padding = torch.zeros(3, 7, dtype=torch.bool)
    padding[1, 5:] = True
    mask = torch.randn(5, 7)
    for kwargs in ({}, {"key_padding_mask": padding}, {"attn_mask": mask, "need_weights": False},
                   {"attn_mask": mask > 1, "key_padding_mask": padding,
                    "average_attn_weights": False},
                   {"attn_mask": torch.randn(12, 5, 7)}):
        expected, got = mha(q, k, k, **kwargs), pruned(q, k, k, **kwargs)
        torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=1e-5)
        if expected[1] is not None:
            torch.testing.assert_close(got[1], expected[1], atol=1e-5, rtol=1e-5)
    unbatched = (q[0], k[0], k[0]) if batch_first else (q[:, 0], k[:, 0], k[:, 0])
    for a, b in zip(mha(*unbatched), pruned(*unbatched), strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="is_causal"):
        pruned(q, k, k, is_causal=True)


def test_pruned_encoder_layer_never_takes_the_fused_path():
    """The fast path of nn.TransformerEncoderLayer (eval, no grad) would derive head_dim from
    embed_dim; the pruned layer declines it and gives what its slow path gives."""
    model, X, nc, _ = _fit("transformer_encoder", rank=0.5, prune="heads")
    small = nc.compressed_model_
    layer = small.encoder.layers[0]
    assert isinstance(layer.self_attn, PrunedMultiheadAttention)
    assert layer.self_attn.in_proj_weight.shape == (3 * 2 * 8, 32)
    assert not layer.self_attn._qkv_same_embed_dim
    fast = _run(small, X)  # no_grad: the fast path is tried
    slow = small(X)  # grad enabled: the standard path
    torch.testing.assert_close(fast, slow.detach())
    padding = torch.zeros(X.shape[:2], dtype=torch.bool)
    padding[0, 5:] = True
    with torch.no_grad():
        out = small(X, src_key_padding_mask=padding)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["torchvision_vit", "transformer_encoder"])
def test_flops_count_multihead_attention_outside_its_fused_kernels(name):
    """At all heads the compressed model has the FLOPs of the original (the plain class runs
    its fused kernel, which the counter does not see unless it is turned off)."""
    _, _, nc, _ = _fit(name, rank=1.0, tol=0, prune="heads")
    assert nc.flops_["after"] == nc.flops_["before"]
    assert torch.backends.mha.get_fastpath_enabled()


def test_full_rank_encoder_keeps_the_fast_path():
    model, X, nc, _ = _fit("transformer_encoder", rank=1.0, tol=0, prune="heads")
    attention = nc.compressed_model_.encoder.layers[0].self_attn
    assert type(attention) is nn.MultiheadAttention and attention._qkv_same_embed_dim


def test_pruned_multihead_attention_pickles(tmp_path):
    model, X, nc, _ = _fit("torchvision_vit", rank=0.5, prune="heads")
    torch.save(nc.compressed_model_, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert isinstance(loaded.encoder.layers[0].self_attention, PrunedMultiheadAttention)
    torch.testing.assert_close(_run(loaded, X), _run(nc.compressed_model_, X))


def test_unsupported_multihead_attention_is_reported():
    model = nn.Sequential(nn.Linear(4, 16))
    mha = nn.MultiheadAttention(16, 4, add_bias_kv=True, batch_first=True)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.attn = model, mha

        def forward(self, x):
            x = self.embed(x)
            return self.attn(x, x, x)[0]

    units, skipped = find_heads(Net().eval(), (torch.randn(2, 5, 4),), {})
    assert not units and any("add_bias_kv" in s.reason for s in skipped)


def test_find_heads_leaves_blocks_it_skips_as_they_were():
    model = make_block("transformer_encoder")
    find_heads(model, (torch.randn(2, 7, 6),), {}, exclude=("encoder.layers.1",))
    assert type(model.encoder.layers[1].self_attn) is nn.MultiheadAttention


class _KeyDimAttention(nn.Module):
    """timm EfficientFormer's ``Attention``: per head ``[q_h | k_h | v_h]`` of widths
    ``key_dim, key_dim, val_dim`` in one ``qkv`` (not three equal blocks of heads)."""

    def __init__(self, dim=16, key_dim=4, num_heads=4):
        super().__init__()
        self.num_heads, self.key_dim, self.val_dim = num_heads, key_dim, key_dim
        self.qkv = nn.Linear(dim, 3 * key_dim * num_heads)
        self.proj = nn.Linear(key_dim * num_heads, dim)

    def forward(self, x):
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, self.num_heads, -1).permute(0, 2, 1, 3).split(
            [self.key_dim, self.key_dim, self.val_dim], dim=3)
        x = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, -1)
        return self.proj(x)


def test_interleaved_and_normed_heads_are_skipped_with_the_reason():
    from skid.nn._heads import attention_layout

    assert "key_dim" in attention_layout(_KeyDimAttention())
    from .blocks import Attention

    normed = Attention(16, 4)
    normed.norm = nn.LayerNorm(16)  # timm's scale_norm
    assert "scale_norm" in attention_layout(normed)


def test_blocks_left_out_by_layers_keep_their_class():
    model, X, nc, _ = _fit("torchvision_vit", rank=0.5, prune="heads",
                           layers=["encoder.layers.0.self_attention"])
    layers = nc.compressed_model_.encoder.layers
    assert [r["attention"] for r in nc.layers_ if r["kind"] == "heads"] == [
        "encoder.layers.0.self_attention"]
    assert isinstance(layers[0].self_attention, PrunedMultiheadAttention)
    assert type(layers[1].self_attention) is nn.MultiheadAttention
