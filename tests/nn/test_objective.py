"""objective="outputs": channels chosen for what the consumer computes; T stays least squares."""

import numpy as np
import pytest
import torch
from torch import nn

from skid.nn import NetworkCompressor

from .models import ARCHITECTURES, call_args


def _consumer_io(model, consumer, X):
    """The consumer's input (rows × channels) and its output without bias, float64."""
    seen = {}
    module = model.get_submodule(consumer)

    def keep_input(module, inputs):
        seen["z"] = inputs[0]

    handle = module.register_forward_pre_hook(keep_input)
    with torch.no_grad():
        model(X)
    handle.remove()
    z = seen["z"].double().reshape(-1, module.in_features)
    return z, z @ module.weight.detach().double().T


@pytest.mark.filterwarnings("ignore:objective='outputs' does not apply")
@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_full_rank_reproduces_every_architecture(name, call):
    factory, make_input = ARCHITECTURES[name]
    model, batch = factory(), make_input(n=64)
    try:
        nc = NetworkCompressor(model, rank=1.0, tol=0, objective="outputs").fit(batch)
    except ValueError as exc:
        pytest.skip(str(exc)[:60])
    torch.testing.assert_close(call(nc.compressed_model_, batch), call(model, batch),
                               atol=1e-5, rtol=1e-5)


def _wide_mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 40), nn.ReLU(), nn.Linear(40, 3))
    with torch.no_grad():  # the consumer reads a few channels strongly, most barely
        model[2].weight.mul_(torch.logspace(-3, 0, 40))
    return model.eval()


def test_reported_error_is_the_consumers_output_error():
    model, X = _wide_mlp(), torch.randn(500, 10)
    nc = NetworkCompressor(model, rank=0.25, objective="outputs").fit(X)
    z, y = _consumer_io(model, "2", X)
    small_z, small_y = _consumer_io(nc.compressed_model_, "2", X)
    error = torch.linalg.norm(small_y - y) / torch.linalg.norm(y)
    assert float(error) == pytest.approx(nc.layers_[0]["error"], rel=1e-4)


def test_outputs_objective_reconstructs_outputs_better_on_its_data():
    model, X = _wide_mlp(), torch.randn(500, 10)
    errors = {}
    for objective in ("activations", "outputs"):
        nc = NetworkCompressor(model, rank=0.25, objective=objective).fit(X)
        _, y = _consumer_io(model, "2", X)
        _, small_y = _consumer_io(nc.compressed_model_, "2", X)
        errors[objective] = float(torch.linalg.norm(small_y - y) / torch.linalg.norm(y))
    assert errors["outputs"] <= errors["activations"]


def test_tol_bounds_the_output_error():
    model, X = _wide_mlp(), torch.randn(500, 10)
    nc = NetworkCompressor(model, tol=0.05, objective="outputs").fit(X)
    _, y = _consumer_io(model, "2", X)
    _, small_y = _consumer_io(nc.compressed_model_, "2", X)
    assert float(torch.linalg.norm(small_y - y) / torch.linalg.norm(y)) <= 0.05 + 1e-6
    assert nc.layers_[0]["width_after"] < 40


@pytest.mark.parametrize("calibration", ["sequential"])
def test_outputs_objective_with_sequential_calibration(calibration):
    factory, make_input = ARCHITECTURES["vgg"]
    model, batch = factory(), make_input(n=32)
    for params in ({"tol": 0.2}, {"target_flops": 0.5}):
        nc = NetworkCompressor(model, objective="outputs", calibration=calibration, **params)
        nc.fit(batch)
        args, kwargs = call_args(batch)
        with torch.no_grad():
            assert nc.compressed_model_(*args, **kwargs).shape == model(*args, **kwargs).shape
        assert np.all([row["error"] <= 1 for row in nc.layers_])


def test_outputs_objective_with_corrective_calibration():
    """Once refused; now composed (see tests/nn/test_planner.py for exactness and errors)."""
    factory, make_input = ARCHITECTURES["mlp"]
    nc = NetworkCompressor(factory(), rank=0.5, objective="outputs", calibration="corrective")
    nc.fit(make_input(n=64))
    assert all(r["width_after"] < r["width_before"] for r in nc.layers_)


def test_weight_gram_of_each_consumer_kind():
    from skid.nn._surgery import weight_gram

    linear = nn.Linear(6, 4)
    W = linear.weight.detach().double().numpy()
    np.testing.assert_allclose(weight_gram(linear), W.T @ W, atol=1e-12)
    flat = weight_gram(linear, positions=2)  # channel-major (3 channels × 2 positions)
    w = W.reshape(4, 3, 2)
    np.testing.assert_allclose(flat, np.einsum("omp,onp->mn", w, w), atol=1e-12)
    conv = nn.Conv2d(4, 6, 3, groups=2)
    w = conv.weight.detach().double().numpy().reshape(6, 2, 9)
    gram = weight_gram(conv)
    np.testing.assert_allclose(gram[:2, :2], np.einsum("omr,onr->mn", w[:3], w[:3]), atol=1e-12)
    np.testing.assert_allclose(gram[2:, 2:], np.einsum("omr,onr->mn", w[3:], w[3:]), atol=1e-12)
    assert not gram[:2, 2:].any()  # a group's outputs never read the other group's channels


def test_weight_gram_of_hf_conv1d():
    transformers = pytest.importorskip("transformers")
    conv1d = transformers.pytorch_utils.Conv1D(4, 6)  # nf=4 outputs, nx=6 inputs
    from skid.nn._surgery import weight_gram

    W = conv1d.weight.detach().double().numpy()  # stored (in, out)
    np.testing.assert_allclose(weight_gram(conv1d), W @ W.T, atol=1e-12)


def test_groups_with_several_readings_keep_the_activation_objective():
    from .blocks import BLOCKS, make_block

    model, batch = make_block("mbconv_se"), BLOCKS["mbconv_se"][1](n=8)
    with pytest.warns(UserWarning, match="keep the activation objective"):
        nc = NetworkCompressor(model, rank=0.5, objective="outputs").fit(batch)
    assert nc.layers_
