"""fit_intercept: T with a constant column, the constant folded into the consumer's bias."""

import numpy as np
import pytest
import torch
from torch import nn

from skid import _corrective
from skid._linalg import GramAccumulator, QRAccumulator
from skid.nn import NetworkCompressor
from skid.nn._intercept import InterceptFactorization, fitting_intercept, with_constant
from skid.nn._surgery import fold_constant


def _offset_rows(n=400, m=12, rank=5, seed=0):
    """Rows of rank ``rank`` plus a large constant offset (what a ReLU's output looks like)."""
    rng = np.random.default_rng(seed)
    Z = rng.standard_normal((n, rank)) @ rng.standard_normal((rank, m))
    return Z + 3.0 + rng.standard_normal((n, m)) * 0.05


def _lstsq_with_constant(Zc, Zo, keep):
    """Reference: least squares of Zo on [Zc[:, keep], 1]."""
    A = np.hstack([Zc[:, keep], np.ones((Zc.shape[0], 1))])
    coef = np.linalg.lstsq(A, Zo, rcond=None)[0]
    residual = np.linalg.norm(Zo - A @ coef) / np.linalg.norm(Zo)
    return coef[:-1], coef[-1], residual


@pytest.mark.parametrize("accumulator", [GramAccumulator, QRAccumulator])
def test_intercept_factorization_is_least_squares_with_a_constant_column(accumulator):
    Z = _offset_rows()
    acc = accumulator().update(with_constant(torch.as_tensor(Z)))
    fac = InterceptFactorization.from_accumulator(acc)
    for k in (1, 3, 5, 8):
        keep, T = fac.select(k)
        T_ref, b_ref, error = _lstsq_with_constant(Z, Z, keep)
        b = fac.mean - T.T @ fac.mean[keep]
        np.testing.assert_allclose(T, T_ref, atol=1e-6)
        np.testing.assert_allclose(b, b_ref, atol=1e-6)
        assert fac.errors[k] == pytest.approx(error, rel=1e-5, abs=1e-9)
    keep, T = fac.select(Z.shape[1])  # full width: identity, no constant
    np.testing.assert_allclose(T[np.argsort(keep)], np.eye(Z.shape[1]), atol=1e-9)
    np.testing.assert_allclose(fac.mean - T.T @ fac.mean[keep], 0.0, atol=1e-9)


def test_the_constant_lowers_the_error_of_the_same_channels():
    Z = _offset_rows()
    plain = GramAccumulator().update(torch.as_tensor(Z)).factorize()
    with_mean = InterceptFactorization.from_accumulator(
        GramAccumulator().update(with_constant(torch.as_tensor(Z))))
    assert with_mean.errors[1] < plain.errors[1]  # the offset costs the plain ID a channel
    assert with_mean.errors[5] < 0.1 * plain.errors[5]


@pytest.mark.parametrize("method", ["gram", "qr"])
def test_corrective_statistics_with_means_fit_the_original_with_a_constant(method):
    rng = np.random.default_rng(1)
    Zo = _offset_rows(seed=2)
    Zc = Zo + rng.standard_normal(Zo.shape) * 0.3 + 0.5  # upstream errors, and a shift
    acc = _corrective.CrossAccumulator(method, intercept=True)
    for rows in np.array_split(np.arange(len(Zo)), 3):
        acc.update(torch.as_tensor(Zc[rows]), torch.as_tensor(Zo[rows]))
    stats = acc.statistics()
    keep = np.array([0, 4, 7])
    fitted, T, error = stats.fit(keep)
    T_ref, b_ref, residual = _lstsq_with_constant(Zc, Zo, fitted)
    mean_c, mean_o = stats.means
    np.testing.assert_allclose(T, T_ref, atol=1e-6)
    np.testing.assert_allclose(mean_o - T.T @ mean_c[fitted], b_ref, atol=1e-6)
    assert error == pytest.approx(residual, rel=1e-6)
    fac = stats.factorize()
    k_keep, k_T = fac.select(4)
    assert fac.errors[4] == pytest.approx(_lstsq_with_constant(Zc, Zo, k_keep)[2], rel=1e-5)


def test_fold_constant_adds_w_b_and_creates_a_missing_bias():
    torch.manual_seed(0)
    b = torch.randn(6)
    linear = nn.Linear(6, 3, bias=False)
    x = torch.randn(5, 6)
    expected = linear(x + b)
    fold_constant(linear, b)
    assert isinstance(linear.bias, nn.Parameter) and linear.bias.shape == (3,)
    torch.testing.assert_close(linear(x), expected)
    for conv, spatial in ((nn.Conv1d(6, 4, 3, bias=False), (7,)), (nn.Conv2d(6, 4, 3), (7, 7)),
                          (nn.Conv3d(6, 4, 2), (4, 4, 4))):  # no padding: every tap reads b
        images = torch.randn(2, 6, *spatial)
        expected = conv(images + b.reshape(6, *(1,) * len(spatial)))
        fold_constant(conv, b)
        torch.testing.assert_close(conv(images), expected, rtol=1e-5, atol=1e-5)
    flat = nn.Linear(6 * 4, 3)  # flatten → Linear: the constant repeats over 4 positions
    maps = torch.randn(5, 6, 4)
    expected = flat((maps + b[:, None]).flatten(1))
    fold_constant(flat, b, positions=4)
    torch.testing.assert_close(flat(maps.flatten(1)), expected, rtol=1e-5, atol=1e-5)


def _relu_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16, bias=False), nn.ReLU(),
                         nn.Linear(16, 4)).eval()


@pytest.mark.parametrize("calibration", ["original", "sequential", "corrective"])
@pytest.mark.parametrize("method", ["gram", "qr"])
def test_exact_at_full_width_in_every_mode(calibration, method):
    model, X = _relu_mlp(), torch.randn(300, 8)
    nc = NetworkCompressor(model, rank=1.0, fit_intercept=True, calibration=calibration,
                           method=method).fit(X)
    with torch.no_grad():
        torch.testing.assert_close(nc.compressed_model_(X), model(X), rtol=1e-5, atol=1e-5)
    assert model[2].bias is None  # the caller's model is untouched
    assert isinstance(nc.compressed_model_[2].bias, nn.Parameter)  # the consumer got one


@pytest.mark.parametrize("calibration", ["original", "sequential", "corrective"])
def test_the_folded_constant_is_what_the_fit_says(calibration):
    """The compressed model's consumer input is the fit ``Z_J T + 1 bᵀ``: its error against the
    original's input is the reported error, which the constant makes smaller."""
    model, X = _relu_mlp(), torch.randn(400, 8)
    errors = {}
    for flag in (False, True):
        nc = NetworkCompressor(model, rank=0.25, fit_intercept=flag, prune="channels",
                               calibration=calibration, layers=["0"]).fit(X)
        errors[flag] = nc.layers_[0]["error"]
        with torch.no_grad():
            Z = torch.relu(model[0](X))
            seen = torch.relu(nc.compressed_model_[0](X))
        selection = nc.plan_.selections[0]
        order = np.argsort(selection.keep.numpy())  # the producer keeps them ascending
        rebuilt = seen @ torch.as_tensor(selection.interpolation)[order].to(seen.dtype)
        if flag:
            rebuilt = rebuilt + selection.intercepts[0].to(seen.dtype)
        measured = float((Z - rebuilt).norm() / Z.norm())
        assert measured == pytest.approx(errors[flag], rel=1e-3, abs=1e-6)
    assert errors[True] < errors[False]


def test_a_convolution_gets_the_constant():
    from .models import make_cnn2d

    model, X = make_cnn2d(), torch.randn(64, 3, 8, 8)
    full = NetworkCompressor(model, rank=1.0, fit_intercept=True).fit(X)
    with torch.no_grad():
        torch.testing.assert_close(full.compressed_model_(X), model(X), rtol=1e-4, atol=1e-5)
    nc = NetworkCompressor(model, rank=0.5, fit_intercept=True).fit(X)
    assert any(s.intercepts is not None for s in nc.plan_.selections)


def test_the_intercept_changes_the_cache_key(tmp_path):
    model, X = _relu_mlp(), torch.randn(200, 8)
    plain = NetworkCompressor(model, rank=0.25, memory=tmp_path).fit(X)
    centred = NetworkCompressor(model, rank=0.25, memory=tmp_path, fit_intercept=True).fit(X)
    assert centred.n_calibration_passes_ > 0
    assert plain.plan_.selections[0].intercepts is None
    assert centred.plan_.selections[0].intercepts is not None


def test_reload_with_save_compressed(tmp_path):
    pytest.importorskip("safetensors")
    from skid.nn import load_compressed, save_compressed

    model, X = _relu_mlp(), torch.randn(200, 8)
    nc = NetworkCompressor(model, rank=0.25, fit_intercept=True).fit(X)
    save_compressed(nc, tmp_path)
    torch.manual_seed(5)
    fresh = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16, bias=False),
                          nn.ReLU(), nn.Linear(16, 4))
    loaded = load_compressed(fresh, tmp_path)
    assert isinstance(loaded[2].bias, nn.Parameter)
    with torch.no_grad():
        torch.testing.assert_close(loaded(X), nc.compressed_model_(X))


def test_intercept_outside_a_fit_is_off():
    from skid.nn import _intercept

    assert not _intercept.active()
    with fitting_intercept(True):
        assert _intercept.active()
    assert not _intercept.active()


# ------------------------------------------------------------------------------ Hugging Face


def _llama(**extra):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=32,
        **extra)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def _tokens(n=16, seed=0):
    return torch.randint(0, 40, (n, 12), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("calibration", ["original", "corrective"])
def test_heads_and_channels_of_a_llama_exact_at_full_width(calibration):
    model, X = _llama(), _tokens()
    nc = NetworkCompressor(model, rank=1.0, fit_intercept=True, calibration=calibration).fit(X)
    with torch.no_grad():
        torch.testing.assert_close(nc.compressed_model_(X).logits, model(X).logits,
                                   rtol=1e-4, atol=1e-4)
    heads = [s for s in nc.plan_.selections if s.unit.kind == "heads"]
    assert heads and all(s.intercept is not None for s in heads)
    assert nc.compressed_model_.config.attention_bias and nc.compressed_model_.config.mlp_bias
    assert not model.config.mlp_bias  # the caller's config is untouched


def test_llama_reloads_with_from_pretrained(tmp_path):
    transformers = pytest.importorskip("transformers")
    model, X = _llama(), _tokens()
    nc = NetworkCompressor(model, rank=0.5, prune="channels", fit_intercept=True).fit(X)
    small = nc.compressed_model_
    assert small.config.mlp_bias and small.model.layers[0].mlp.gate_proj.bias is not None
    # one width per MLP (rank): the config's width is what uniform=True will write
    small.config.intermediate_size = small.model.layers[0].mlp.down_proj.in_features
    small.save_pretrained(tmp_path)
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(X).logits, small(X).logits)


def test_a_class_that_cannot_hold_the_bias_is_refused():
    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen2Config(
        vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = transformers.Qwen2ForCausalLM(config).eval()
    with pytest.raises(ValueError, match="mlp.down_proj.*fit_intercept=False"):
        NetworkCompressor(model, rank=0.5, prune="channels", fit_intercept=True).fit(_tokens())


def test_gpt2_conv1d_consumers_take_the_constant():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=40, n_embd=16, n_layer=2, n_head=4,
                                     n_positions=32, n_inner=24)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    X = _tokens()
    full = NetworkCompressor(model, rank=1.0, fit_intercept=True).fit(X)
    with torch.no_grad():
        torch.testing.assert_close(full.compressed_model_(X).logits, model(X).logits,
                                   rtol=1e-4, atol=1e-4)
    nc = NetworkCompressor(model, rank=0.5, fit_intercept=True).fit(X)
    assert all(getattr(s, "intercepts", None) is not None or s.intercept is not None
               for s in nc.plan_.selections)


def test_the_outputs_objective_keeps_the_constant():
    model, X = _relu_mlp(), torch.randn(300, 8)
    full = NetworkCompressor(model, rank=1.0, fit_intercept=True, objective="outputs").fit(X)
    with torch.no_grad():
        torch.testing.assert_close(full.compressed_model_(X), model(X), rtol=1e-5, atol=1e-5)
    nc = NetworkCompressor(model, rank=0.25, fit_intercept=True, objective="outputs").fit(X)
    assert all(s.intercepts is not None for s in nc.plan_.selections)
