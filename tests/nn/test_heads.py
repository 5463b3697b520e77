"""Attention heads: layouts of the HF families, the head ID, and the surgery."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

from skid.exceptions import InvalidParameterError
from skid.nn import NetworkCompressor
from skid.nn._head_discovery import find_heads
from skid.nn._heads import (
    HeadFactorization,
    HeadSelection,
    apply_head_selection,
    attention_layout,
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
    units, skipped = find_heads(mha, (torch.randn(2, 5, 16),), {}, exclude=("layers.0",))
    assert not units
    assert any("excluded" in s.reason for s in skipped)
    assert attention_layout(nn.Linear(3, 3)) is None
    assert "add_bias_kv" in attention_layout(nn.MultiheadAttention(16, 4, add_bias_kv=True))


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


# ------------------------------------------------------------------- in NetworkCompressor


def _gpt2():
    config = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=32, vocab_size=40,
                                     n_positions=16)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval()


COMPRESSED = {**MODELS, "gpt2": (_gpt2, lambda **k: ((_ids(**k),), {}), "transformer.h.{}.attn")}


def _fit(name, n=16, **params):
    factory, inputs, pattern = COMPRESSED[name]
    model = factory()
    (X,), _ = inputs(n=n)
    return model, X, NetworkCompressor(model, **params).fit(X), pattern


def _check_grouping(model):
    """Every attention block's projections agree with its head attributes."""
    for _, module in model.named_modules():
        q, k = getattr(module, "q_proj", None), getattr(module, "k_proj", None)
        groups = getattr(module, "num_key_value_groups", None)
        if q is not None and groups is not None:
            assert q.out_features == groups * k.out_features
            assert q.out_features % module.head_dim == 0


@pytest.mark.parametrize("name", sorted(COMPRESSED))
def test_compressor_prunes_heads_by_name_and_counts_heads(name):
    model, X, nc, pattern = _fit(name, rank=0.5)
    heads = [row for row in nc.layers_ if row["kind"] == "heads"]
    assert [row["attention"] for row in heads] == [pattern.format(i) for i in range(2)]
    unit = find_heads(model, (X[:2],), {})[0][0]
    for row in heads:
        assert row["width_before"] == unit.n_heads
        size = unit.group_size
        expected = (-(-unit.n_heads // 2) if size == 1 else -(-size // 2) * unit.n_kv_heads)
        assert row["width_after"] == expected
        assert 0 <= row["error"] <= 1
    assert any(row["kind"] == "channels" for row in nc.layers_)
    with torch.no_grad():
        out = _first(nc.compressed_model_(X))
    assert out.shape == _first(model(X)).shape
    _check_grouping(nc.compressed_model_)


@pytest.mark.parametrize("name", sorted(COMPRESSED))
@pytest.mark.parametrize("prune", [("heads",), ("channels", "heads")])
def test_full_rank_reproduces_the_model(name, prune):
    model, X, nc, _ = _fit(name, n=32, rank=1.0, tol=0, prune=prune)
    with torch.no_grad():
        torch.testing.assert_close(_first(nc.compressed_model_(X)), _first(model(X)),
                                   atol=1e-5, rtol=1e-5)


def test_prune_selects_the_structures():
    _, _, channels, _ = _fit("llama_gqa", rank=0.5, prune=("channels",))
    assert {row["kind"] for row in channels.layers_} == {"channels"}
    _, _, heads, _ = _fit("llama_gqa", rank=0.5, prune="heads")
    assert {row["kind"] for row in heads.layers_} == {"heads"}
    for bad in (("bogus",), (), ("heads", "heads"), "all"):
        with pytest.raises(InvalidParameterError, match="prune"):
            _fit("llama_gqa", prune=bad)


def test_grouped_query_grouping_stays_valid_across_settings():
    factory, inputs, _ = COMPRESSED["llama_gqa"]
    model = factory()
    (X,), _ = inputs(n=16)
    for params in [{"rank": r} for r in (0.1, 0.3, 0.5, 0.7, 0.9)] + [
        {"tol": t} for t in (0.0, 0.05, 0.2, 0.5, 0.9)
    ] + [{"target_flops": t} for t in (0.85, 0.9)]:
        nc = NetworkCompressor(model, prune="heads", **params).fit(X)
        _check_grouping(nc.compressed_model_)
        with torch.no_grad():
            nc.compressed_model_(X)
        if "target_flops" in params:
            assert nc.flops_["after"] <= params["target_flops"] * nc.flops_["before"] * 1.0001


def test_padding_rows_are_left_out_of_the_head_statistics():
    factory = COMPRESSED["bert"][0]
    model = factory()
    ids = _ids(n=16, length=10)
    mask = torch.ones_like(ids)
    mask[8:, 6:] = 0
    other = ids.clone()
    other[8:, 6:] = (other[8:, 6:] + 7) % 40  # only the padded tokens differ
    fits = [NetworkCompressor(model, rank=0.5, prune="heads").fit(
        {"input_ids": x, "attention_mask": mask}) for x in (ids, other)]
    assert [r["error"] for r in fits[0].layers_] == pytest.approx(
        [r["error"] for r in fits[1].layers_], abs=1e-12)
    unpadded = NetworkCompressor(model, rank=0.5, prune="heads").fit({"input_ids": ids})
    assert [r["error"] for r in fits[0].layers_] != pytest.approx(
        [r["error"] for r in unpadded.layers_], abs=1e-9)


def test_heads_for_the_output_projections_outputs():
    model, X, nc, _ = _fit("bert", rank=0.5, prune="heads", objective="outputs")
    act = _fit("bert", rank=0.5, prune="heads")[2]
    assert [r["width_after"] for r in nc.layers_] == [r["width_after"] for r in act.layers_]
    assert all(0 <= r["error"] <= 1 for r in nc.layers_)


def test_save_and_reload_a_head_pruned_model(tmp_path):
    pytest.importorskip("safetensors")
    from skid.nn import load_compressed, save_compressed

    model, X, nc, _ = _fit("llama_gqa", rank=0.5)
    save_compressed(nc, tmp_path)
    torch.manual_seed(1)
    fresh = load_compressed(_llama(), tmp_path)
    _check_grouping(fresh)
    with torch.no_grad():
        torch.testing.assert_close(_first(fresh(X)), _first(nc.compressed_model_(X)))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama_gqa", "bert", "gpt2"])
def test_compressed_transformer_exports(name):
    model, X, nc, _ = _fit(name, rank=0.5)
    kwargs = {"use_cache": False} if name != "bert" else {}
    exported = torch.export.export(nc.compressed_model_, (X[:2],), kwargs=kwargs)
    with torch.no_grad():
        torch.testing.assert_close(_first(exported.module()(X[:2], **kwargs)),
                                   _first(nc.compressed_model_(X[:2], **kwargs)))


@pytest.mark.parametrize("name", ["llama_gqa", "bert", "gpt2"])
def test_corrective_calibration_fits_heads_to_the_original(name, recwarn):
    model, X, full, _ = _fit(name, n=32, rank=1.0, tol=0, calibration="corrective")
    with torch.no_grad():
        torch.testing.assert_close(_first(full.compressed_model_(X)), _first(model(X)),
                                   atol=1e-5, rtol=1e-5)
    _, _, half, _ = _fit(name, n=32, rank=0.5, calibration="corrective")
    heads = [row for row in half.layers_ if row["kind"] == "heads"]
    assert heads and all(row["width_after"] < row["width_before"] for row in heads)
    assert all(0 <= row["error"] <= 1 for row in heads)
    _check_grouping(half.compressed_model_)
    assert not [w for w in recwarn if "does not cover" in str(w.message)]


def test_corrective_head_errors_are_the_fit_to_the_original():
    """On the first block nothing upstream is compressed: the corrective error of the heads
    equals the plain head ID's error at the same count. (Both statistics sum float32
    products, in other orders: a residual of ~1e-4 of the energy agrees to ~1e-4.)"""
    _, _, corrective, _ = _fit("llama_gqa", n=32, rank=0.5, prune="heads",
                               calibration="corrective")
    _, _, original, _ = _fit("llama_gqa", n=32, rank=0.5, prune="heads")
    assert corrective.layers_[0]["error"] == pytest.approx(original.layers_[0]["error"],
                                                           rel=1e-3)
    _, _, corrective, _ = _fit("llama_gqa", n=32, rank=0.5, prune="heads",
                               calibration="corrective", method="qr")
    _, _, original, _ = _fit("llama_gqa", n=32, rank=0.5, prune="heads", method="qr")
    assert corrective.layers_[0]["error"] == pytest.approx(original.layers_[0]["error"],
                                                           rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("request_", [{"target_flops": 0.7}, {"rank": 0.5}],
                         ids=["target_flops", "rank"])
@pytest.mark.parametrize("calibration", ["original", "sequential", "corrective"])
def test_blockwise_heads_and_channels_equal_one_pass(calibration, request_):
    """Heads and channels, block by block (under a FLOP budget: error curves with their valid
    head counts) and in one pass, give the same model in every calibration."""
    factory, inputs, _ = COMPRESSED["llama_gqa"]
    model = factory()
    (X,), _ = inputs(n=16)
    fits = [NetworkCompressor(model, calibration=calibration, blocks=blocks, **request_).fit(X)
            for blocks in ("auto", None)]
    assert fits[0].blocks_ == "model.layers" and fits[1].blocks_ is None
    cut = [r["kind"] for r in fits[0].layers_ if r["width_after"] < r["width_before"]]
    assert "heads" in cut if "rank" in request_ else cut  # a budget may spare the heads
    assert [r["width_after"] for r in fits[0].layers_] == [
        r["width_after"] for r in fits[1].layers_]
    assert [r["error"] for r in fits[0].layers_] == pytest.approx(
        [r["error"] for r in fits[1].layers_], rel=1e-6, abs=1e-9)
    a, b = (f.compressed_model_.state_dict() for f in fits)
    for name, tensor in a.items():
        torch.testing.assert_close(tensor, b[name], atol=1e-6, rtol=1e-5, msg=name)
    _check_grouping(fits[0].compressed_model_)
