"""Attention heads: layouts of the HF families, the head ID, and the surgery."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

from skid.nn._heads import (
    HeadFactorization,
    HeadSelection,
    apply_head_selection,
    attention_layout,
    find_heads,
)

transformers = pytest.importorskip("transformers")


def _llama(heads=6, kv=2, layers=2, cls="Llama"):
    config = getattr(transformers, f"{cls}Config")(
        vocab_size=40, hidden_size=48, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=32,
        head_dim=48 // heads,
    )
    torch.manual_seed(0)
    return getattr(transformers, f"{cls}ForCausalLM")(config).eval()


def _bert():
    config = transformers.BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=48,
                                     max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.BertModel(config).eval()


def _vit():
    config = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=32,
                                    num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=48)
    torch.manual_seed(0)
    return transformers.ViTModel(config).eval()


def _ids(n=4, length=10, seed=0):
    return torch.randint(0, 40, (n, length), generator=torch.Generator().manual_seed(seed))


def _images(n=4, seed=0):
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


MODELS = {
    "llama_gqa": (_llama, lambda **k: ((_ids(**k),), {}), "model.layers.{}.self_attn"),
    "llama_mha": (lambda: _llama(4, 4), lambda **k: ((_ids(**k),), {}),
                  "model.layers.{}.self_attn"),
    "qwen2": (lambda: _llama(cls="Qwen2"), lambda **k: ((_ids(**k),), {}),
              "model.layers.{}.self_attn"),
    "bert": (_bert, lambda **k: ((_ids(**k),), {}), "encoder.layer.{}.attention"),
    "vit": (_vit, lambda **k: ((_images(**k),), {}), "layers.{}.attention"),
}


def _first(output):
    return output if isinstance(output, torch.Tensor) else output[0]


def _grams(model, units, args, kwargs):
    """Float64 Gram of every output projection's input on one batch."""
    grams, handles = {}, []
    for unit in units:
        def hook(module, inputs, unit=unit):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
            grams[unit.attention] = grams.get(unit.attention, 0) + x.T @ x
        handles.append(model.get_submodule(unit.consumer).register_forward_pre_hook(hook))
    with torch.no_grad():
        model(*args, **kwargs)
    for handle in handles:
        handle.remove()
    return {name: gram.numpy() for name, gram in grams.items()}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_heads_are_found_in_forward_order(name):
    factory, inputs, pattern = MODELS[name]
    units, skipped = find_heads(factory(), *inputs())
    assert [u.attention for u in units] == [pattern.format(i) for i in range(2)]
    assert not [s for s in skipped if "never called" in s.reason]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_all_heads_kept_reproduces_the_model(name):
    factory, inputs, _ = MODELS[name]
    model = factory()
    args, kwargs = inputs(n=8)
    units, _ = find_heads(model, args, kwargs)
    grams = _grams(model, units, args, kwargs)
    small = copy.deepcopy(model)
    for unit in units:
        fac = HeadFactorization(grams[unit.attention], unit)
        apply_head_selection(small, fac.select(unit.n_heads))
    with torch.no_grad():
        torch.testing.assert_close(_first(small(*args, **kwargs)), _first(model(*args, **kwargs)),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_valid_head_count_runs_and_has_its_exact_error(name):
    factory, inputs, _ = MODELS[name]
    model = factory()
    args, kwargs = inputs(n=8)
    units, _ = find_heads(model, args, kwargs)
    unit = units[0]
    gram = _grams(model, units, args, kwargs)[unit.attention]
    fac = HeadFactorization(gram, unit)
    Z = {}

    def keep_input(module, inputs):
        Z.setdefault("z", inputs[0].reshape(-1, inputs[0].shape[-1]).double())

    handle = model.get_submodule(unit.consumer).register_forward_pre_hook(keep_input)
    with torch.no_grad():
        model(*args, **kwargs)
    handle.remove()
    z = Z["z"].numpy()
    for k in fac.valid_counts:
        selection = fac.select(k)
        cols = (selection.heads[:, None] * unit.head_dim + np.arange(unit.head_dim)).ravel()
        error = np.linalg.norm(z - z[:, cols] @ selection.interpolation) / np.linalg.norm(z)
        assert error == pytest.approx(selection.error, abs=1e-6)
        assert selection.heads.size % selection.kv_heads.size == 0
        small = apply_head_selection(copy.deepcopy(model), selection)
        with torch.no_grad():
            out = _first(small(*args, **kwargs))
        assert out.shape == _first(model(*args, **kwargs)).shape
        attention = small.get_submodule(unit.attention)
        q = small.get_submodule(unit.producer)
        assert q.out_features == selection.heads.size * unit.head_dim
        groups = getattr(attention, "num_key_value_groups", None)
        if groups is not None:
            k_proj = small.get_submodule(unit.name(unit.layout.keys))
            assert groups * k_proj.out_features == q.out_features


def test_grouped_query_counts_keep_a_valid_grouping():
    model = _llama(heads=6, kv=2)
    units, _ = find_heads(model, (_ids(),), {})
    unit = units[0]
    assert (unit.n_heads, unit.n_kv_heads, unit.group_size) == (6, 2, 3)
    gram = _grams(model, units, (_ids(n=8),), {})[unit.attention]
    fac = HeadFactorization(gram, unit)
    assert fac.valid_counts == [2, 3, 4, 6]  # 1 or 2 per group of 3; or whole groups
    assert fac.valid(5) in (4, 3) and fac.valid(1) == 2
    assert np.all(np.diff(fac.errors) <= 1e-12)
    assert fac.width_for_rank(0.5) == 4  # ceil(0.5 * 3) = 2 per group
    assert fac.select(3).heads.size in (2, 3)  # 2 when one head per group already does better
    # Whole key/value group 1 (query heads 3-5), T by least squares: keys/values are sliced.
    cols = np.arange(3 * unit.head_dim, 6 * unit.head_dim)
    T = np.linalg.lstsq(gram[np.ix_(cols, cols)], gram[cols], rcond=None)[0]
    whole = HeadSelection(unit, np.array([3, 4, 5]), np.array([1]), T, 0.0)
    small = apply_head_selection(copy.deepcopy(model), whole)
    attention = small.get_submodule(unit.attention)
    assert attention.k_proj.out_features == unit.head_dim and attention.num_key_value_groups == 3
    assert attention.q_proj.out_features == 3 * unit.head_dim
    with torch.no_grad():
        small(_ids())


def test_unsupported_attention_is_reported():
    mha = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 32, batch_first=True), 1)
    units, skipped = find_heads(mha, (torch.randn(2, 5, 16),), {})
    assert not units
    assert any("MultiheadAttention" in s.reason for s in skipped)
    assert attention_layout(nn.Linear(3, 3)) is None


def test_t5_is_skipped_with_its_reason():
    config = transformers.T5Config(vocab_size=40, d_model=16, d_kv=4, d_ff=32, num_layers=1,
                                   num_heads=4)
    model = transformers.T5EncoderModel(config).eval()
    units, skipped = find_heads(model, (_ids(),), {})
    assert not units and any("relative position bias" in s.reason for s in skipped)


@pytest.mark.slow
def test_pruned_llama_exports():
    model = _llama()
    args, kwargs = (_ids(n=2, length=6),), {}
    units, _ = find_heads(model, args, kwargs)
    grams = _grams(model, units, args, kwargs)
    for unit in units:
        apply_head_selection(model, HeadFactorization(grams[unit.attention], unit).select(4))
    no_cache = {"use_cache": False}
    exported = torch.export.export(model, args, kwargs=no_cache)
    torch.testing.assert_close(_first(exported.module()(*args, **no_cache)),
                               _first(model(*args, **no_cache)))
