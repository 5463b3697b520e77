"""prune="residual": the residual stream of HF transformers, rotated and sliced."""

import json
import warnings

import numpy as np
import pytest
import torch

from skid.exceptions import NotPrunableError
from skid.nn import NetworkCompressor, load_compressed, save_compressed

from .hf_models import HF_MODELS, VOCAB

transformers = pytest.importorskip("transformers")

ALL = ("channels", "heads", "residual")


def _gemma():
    config = transformers.GemmaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=24,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, head_dim=4,
                                      max_position_embeddings=32)
    return transformers.GemmaForCausalLM(config)


def _vit_classifier():
    config = transformers.ViTConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=24, image_size=8, patch_size=4,
                                    num_channels=3, num_labels=5)
    return transformers.ViTForImageClassification(config)


MODELS = {
    **{k: HF_MODELS[k] for k in ("llama", "qwen2", "mistral", "gpt2")},
    "gemma": (_gemma, HF_MODELS["llama"][1]),
    "vit": (_vit_classifier, HF_MODELS["vit"][1]),
}
CAUSAL = ("llama", "qwen2", "mistral", "gemma", "gpt2")


def _model(name):
    """A tiny model with every weight perturbed: norm gains and biases are not 1 and 0, so a
    gain or bias folded into the wrong place shows."""
    factory, make_input = MODELS[name]
    torch.manual_seed(0)
    model = factory().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model, make_input(24, seed=1)


def _run(model, X, **kwargs):
    with torch.no_grad():
        out = model(**X, **kwargs) if isinstance(X, dict) else model(X, **kwargs)
    return (out.logits if hasattr(out, "logits") else out[0]).double()


def _fit(name, **params):
    model, X = _model(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the untying warning of tied models
        nc = NetworkCompressor(model, **params).fit(X)
    return model, X, nc


def _relative(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("name", list(MODELS))
def test_full_width_rotation_is_exact(name):
    model, X, nc = _fit(name, rank=1.0, prune="residual")
    assert _relative(_run(nc.compressed_model_, X), _run(model, X)) < 1e-5
    (row,) = nc.layers_
    assert row["kind"] == "residual" and row["width_before"] == row["width_after"] == 16
    assert row["error"] < 1e-6


@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral", "gemma"])
def test_full_width_joint_id_is_exact(name):
    model, X, nc = _fit(name, rank=1.0, prune="residual", stream="select")
    assert _relative(_run(nc.compressed_model_, X), _run(model, X)) < 1e-5
    assert nc.layers_[0]["stream"] == "select"


def test_joint_id_keeps_stream_coordinates():
    model, X, nc = _fit("llama", rank=0.5, prune="residual", stream="select")
    embed = nc.compressed_model_.model.embed_tokens.weight
    original = model.model.embed_tokens.weight
    # every kept column of the embedding is one of the original's columns, unrotated
    matches = [(torch.isclose(original, embed[:, [j]]).all(0)).any() for j in range(8)]
    assert embed.shape == (VOCAB, 8) and all(matches)


def test_joint_id_refuses_layernorm_streams():
    model, X = _model("gpt2")
    with pytest.raises(ValueError, match="RMS-norm streams"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        NetworkCompressor(model, rank=0.5, prune="residual", stream="select").fit(X)


def test_row_names_writers_readers_and_norms():
    _, _, nc = _fit("llama", rank=0.5, prune="residual")
    (row,) = nc.layers_
    assert row["width_after"] == 8
    assert row["producers"][0] == "model.embed_tokens"
    assert "model.layers.1.mlp.down_proj" in row["producers"]
    assert "model.layers.0.self_attn.k_proj" in row["consumers"]
    assert row["consumers"][-1] == "lm_head"
    assert row["norms"] == ["model.layers.0.input_layernorm",
                            "model.layers.0.post_attention_layernorm",
                            "model.layers.1.input_layernorm",
                            "model.layers.1.post_attention_layernorm", "model.norm"]


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_sliced_stream_narrows_every_module(name):
    model, X, nc = _fit(name, rank=0.5, prune="residual")
    small = nc.compressed_model_
    field = "n_embd" if name == "gpt2" else "hidden_size"
    assert getattr(small.config, field) == 8 and getattr(model.config, field) == 16
    embeddings = small.get_input_embeddings()
    assert embeddings.weight.shape == (VOCAB, 8)
    assert small.get_output_embeddings().weight.shape == (VOCAB, 8)
    assert torch.isfinite(_run(small, X)).all()
    assert nc.flops_["after"] < nc.flops_["before"]


def test_tied_embeddings_are_untied_with_a_warning_and_the_caller_keeps_its_tie():
    model, X = _model("gpt2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match="untie"):
        nc = NetworkCompressor(model, rank=0.75, prune="residual").fit(X)
    small = nc.compressed_model_
    assert small.lm_head.weight is not small.transformer.wte.weight
    assert small.config.tie_word_embeddings is False
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.config.tie_word_embeddings is True
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)


@pytest.mark.parametrize("name", list(MODELS))
def test_save_and_load_compressed_round_trip(name, tmp_path):
    _, X, nc = _fit(name, rank=0.5, prune=ALL)
    save_compressed(nc, tmp_path)
    torch.manual_seed(1)
    fresh = load_compressed(MODELS[name][0]().eval(), tmp_path)
    torch.testing.assert_close(_run(fresh, X), _run(nc.compressed_model_, X))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_compressed_stream_exports(name):
    _, X, nc = _fit(name, rank=0.5, prune="residual")
    small = nc.compressed_model_
    if isinstance(X, dict):
        args, kwargs = (), {**{k: v[:2] for k, v in X.items()}, "use_cache": False}
    else:
        args, kwargs = (X[:2],), {}
    exported = torch.export.export(small, args, kwargs=kwargs)
    out = exported.module()(*args, **kwargs)
    out = out.logits if hasattr(out, "logits") else out[0]
    torch.testing.assert_close(out.double(), _run(small, args[0] if args else kwargs))


@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral", "gemma", "gpt2"])
def test_uniform_save_pretrained_reloads_with_auto_class(name, tmp_path):
    model, X = _model(name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        nc = NetworkCompressor(model, rank=0.5, prune=ALL, uniform=True).fit(X)
    assert not any("would not reload" in str(w.message) for w in caught)
    small = nc.compressed_model_
    small.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert not any(key.startswith("skid") for key in config)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(_run(reloaded, X), _run(small, X))


def test_uniform_updates_the_config_fields():
    _, _, nc = _fit("llama", rank=0.5, prune=ALL, uniform=True)
    config = nc.compressed_model_.config
    assert (config.hidden_size, config.intermediate_size) == (8, 12)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (2, 2, 4)


@pytest.mark.parametrize("params", [dict(target_flops=0.5), dict(tol=0.3)])
def test_uniform_gives_one_width_per_kind(params):
    _, _, nc = _fit("llama", prune=ALL, uniform=True, **params)
    for kind in ("channels", "heads"):
        widths = {r["width_after"] for r in nc.layers_ if r["kind"] == kind}
        assert len(widths) == 1, (kind, nc.layers_)


def test_uniform_without_the_residual_leaves_the_hidden_size():
    _, _, nc = _fit("qwen2", rank=0.5, uniform=True)
    assert nc.compressed_model_.config.hidden_size == 16
    assert nc.compressed_model_.config.intermediate_size == 12


def test_uniform_warns_when_the_config_cannot_say_the_widths():
    from skid.nn import _hf_config

    model, X = _model("llama")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nc = NetworkCompressor(model, rank=0.5, prune="channels").fit(X)
    nc.compressed_model_.config.intermediate_size = 24  # what the MLPs no longer are
    with pytest.warns(UserWarning, match="save_compressed"):
        _hf_config._check(nc.compressed_model_, nc.compressed_model_.config)


def test_target_flops_budgets_the_stream_with_the_other_units():
    model, X, nc = _fit("llama", target_flops=0.5, prune=ALL)
    assert nc.flops_["after"] <= 0.5 * nc.flops_["before"] * 1.001
    assert any(r["kind"] == "residual" for r in nc.layers_)


def test_target_flops_holds_out_a_batch_with_the_stream_among_the_units():
    # several batches: the candidates' statistics come from a second pass without the first
    # batch, which must compute the stream's own statistic as the first pass does
    model, X, nc = _fit("llama", target_flops=0.5, prune=ALL, batch_size=8)
    assert nc.flops_["after"] <= 0.5 * nc.flops_["before"] * 1.001
    assert any(r["kind"] == "residual" for r in nc.layers_)


def test_tol_bounds_the_stream_error():
    _, _, nc = _fit("llama", tol=0.2, prune="residual")
    (row,) = nc.layers_
    assert row["error"] <= 0.2 and row["width_after"] < 16


@pytest.mark.parametrize("calibration", ["sequential", "corrective"])
def test_stream_after_the_other_units_in_forward_calibrations(calibration):
    model, X, nc = _fit("llama", rank=1.0, prune=ALL, calibration=calibration)
    assert nc.layers_[-1]["kind"] == "residual"
    assert _relative(_run(nc.compressed_model_, X), _run(model, X)) < 1e-5


def test_named_blocks_with_the_stream_under_target_flops_are_refused():
    model, X = _model("llama")
    with pytest.raises(ValueError, match="one pass"):
        NetworkCompressor(model, target_flops=0.5, prune=ALL, blocks="model.layers").fit(X)


@pytest.mark.parametrize("calibration", ["original", "sequential", "corrective"])
def test_block_wise_calibration_with_the_stream_matches_one_pass(calibration):
    model, X = _model("llama")
    params = dict(rank=0.5, prune=ALL, calibration=calibration)
    blockwise = NetworkCompressor(model, blocks="model.layers", **params).fit(X)
    one_pass = NetworkCompressor(model, blocks=None, **params).fit(X)
    assert blockwise.blocks_ == "model.layers" and one_pass.blocks_ is None
    assert blockwise.layers_[-1]["kind"] == "residual"
    torch.testing.assert_close(_run(blockwise.compressed_model_, X),
                               _run(one_pass.compressed_model_, X), rtol=1e-4, atol=1e-4)


def test_post_norm_stream_is_skipped_with_its_reason():
    factory, make_input = HF_MODELS["bert"]
    with pytest.raises(NotPrunableError, match="post-norm"):
        NetworkCompressor(factory().eval(), rank=0.5, prune="residual").fit(make_input(4))
    nc = NetworkCompressor(factory().eval(), rank=0.5, prune=ALL).fit(make_input(8))
    assert any("post-norm" in s["reason"] for s in nc.skipped_)


def test_a_model_that_outputs_its_stream_is_skipped():
    factory, make_input = HF_MODELS["vit"]  # ViTModel: the last hidden state is the output
    nc = NetworkCompressor(factory().eval(), rank=0.5, prune=ALL).fit(make_input(8))
    assert not any(r["kind"] == "residual" for r in nc.layers_)
    assert any("outputs the stream" in s["reason"] for s in nc.skipped_)


def test_excluding_a_stream_module_leaves_the_stream():
    model, X = _model("llama")
    nc = NetworkCompressor(model, rank=0.5, prune=ALL, exclude=["lm_head"]).fit(X)
    assert not any(r["kind"] == "residual" for r in nc.layers_)
    assert any("'lm_head' is excluded" in s["reason"] for s in nc.skipped_)


def test_stream_error_curve_is_the_principal_tail():
    from skid.nn._rotation import StreamFactorization
    from skid.nn._stream import Norm, Stream

    rng = np.random.default_rng(0)
    data = rng.standard_normal((200, 6)) * np.array([5, 3, 2, 1, 0.5, 0.1])
    gram = data.T @ data
    stream = Stream(width=6, writers=("e",), norms=(Norm("n", ("r",)),), form="rms")
    fac = StreamFactorization(stream, [gram], [200])
    values = np.linalg.eigvalsh(gram)[::-1]
    expected = np.sqrt(np.concatenate([np.cumsum(values[::-1])[::-1], [0]]) / values.sum())
    np.testing.assert_allclose(fac.errors, expected, atol=1e-12)
    selection = fac.select(3)
    np.testing.assert_allclose(selection.write @ selection.write.T, np.eye(3), atol=1e-12)


def test_memory_reads_the_stream_statistics_back(tmp_path, monkeypatch):
    from skid.nn import _residual

    model, X = _model("llama")
    calls = []
    original = _residual.stream_statistics
    monkeypatch.setattr(_residual, "stream_statistics",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    first = NetworkCompressor(model, rank=0.5, prune="residual", memory=tmp_path).fit(X)
    again = NetworkCompressor(model, rank=0.75, prune="residual", memory=tmp_path).fit(X)
    assert len(calls) == 1
    assert first.layers_[0]["width_after"] == 8 and again.layers_[0]["width_after"] == 12


def test_calibration_passes_count_the_stream_pass():
    _, X, nc = _fit("llama", rank=0.5, prune=ALL, batch_size=8, blocks=None)
    assert nc.n_calibration_passes_ == 2 * 3  # the units' pass and the stream's, 3 batches
    assert nc.n_calibration_samples_ == 24


def test_half_precision_model_keeps_its_dtype_and_stream():
    model, X = _model("llama")
    model = model.to(torch.bfloat16)
    nc = NetworkCompressor(model, rank=0.75, prune="residual").fit(X)
    small = nc.compressed_model_
    assert nc.layers_[0]["kind"] == "residual"
    assert all(p.dtype == torch.bfloat16 for p in small.parameters())


@pytest.mark.parametrize("calibration", ["sequential", "corrective"])
def test_uniform_widths_hold_in_forward_calibrations(calibration):
    _, _, nc = _fit("qwen2", tol=0.2, prune=ALL, uniform=True, calibration=calibration)
    for kind in ("channels", "heads"):
        assert len({r["width_after"] for r in nc.layers_ if r["kind"] == kind}) == 1


def test_uniform_tol_holds_block_wise():
    model, X = _model("llama")
    nc = NetworkCompressor(model, tol=0.2, uniform=True, blocks="auto").fit(X)
    assert nc.blocks_ is not None
    for kind in ("channels", "heads"):
        assert len({r["width_after"] for r in nc.layers_ if r["kind"] == kind}) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_stream_on_cuda_stays_there_and_is_exact():
    model, X = _model("llama")
    model = model.cuda()
    X = {k: v.cuda() for k, v in X.items()}
    nc = NetworkCompressor(model, rank=1.0, prune="residual").fit(X)
    small = nc.compressed_model_
    assert all(p.is_cuda for p in small.parameters())
    assert _relative(_run(small, X), _run(model, X)) < 1e-4
