"""Layer kinds: a custom dense layer is one register_layer_kind call; optional-package kinds."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import skid.nn
from skid.nn import NetworkCompressor, _surgery
from skid.nn._flops import count_flops
from skid.nn._graph import find_units
from skid.nn._plan import Unit


class Transposed(nn.Module):
    """A dense layer storing its weight as (in, out), unknown to skid until registered."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out) / n_in ** 0.5)
        self.bias = nn.Parameter(torch.randn(n_out))

    def forward(self, x):
        return x @ self.weight + self.bias


def _slice_out(module, keep):
    module.weight = nn.Parameter(module.weight.detach()[:, keep].contiguous())
    module.bias = nn.Parameter(module.bias.detach()[keep].contiguous())


def _fold_in(module, T):
    weight = module.weight.detach()
    module.weight = nn.Parameter((T @ weight.double()).to(weight.dtype))


@pytest.fixture
def transposed_kind():
    skid.nn.register_layer_kind(
        Transposed, in_width=lambda m: m.weight.shape[0], out_width=lambda m: m.weight.shape[1],
        slice_out=_slice_out, fold_in=_fold_in)
    yield
    del _surgery.KINDS_BY_TYPE[Transposed]


def _stack():
    return nn.Sequential(Transposed(6, 16), nn.ReLU(), Transposed(16, 12), nn.GELU(),
                         Transposed(12, 3)).eval()


def test_unregistered_layer_is_opaque():
    units, skipped = find_units(_stack(), torch.randn(2, 6))
    assert units == [] and skipped == []


def test_registered_kind_is_walked_counted_and_compressed(transposed_kind):
    model = _stack()
    X = torch.randn(64, 6)
    units, skipped = find_units(model, X[:2])
    assert units == [Unit("0", "2", 16), Unit("2", "4", 12)]
    assert "model output" in skipped[0].reason
    _, per_module = count_flops(model, X[:2])
    assert per_module == {"0": 2 * 6 * 16, "2": 2 * 16 * 12, "4": 2 * 12 * 3}
    exact = NetworkCompressor(model, rank=1.0).fit(X)
    np.testing.assert_allclose(exact.transform(X), model(X).detach().numpy(), atol=1e-5)
    half = NetworkCompressor(model, rank=0.5).fit(X)
    small = half.compressed_model_
    assert small[0].weight.shape == (6, 8) and small[2].weight.shape == (8, 6)
    assert small[4].weight.shape == (6, 3)
    assert half.flops_["after"] < half.flops_["before"]


def test_registered_kind_after_a_flatten(transposed_kind):
    """A flatten between a conv and the registered layer: positions fold channel by channel."""
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), Transposed(4 * 16, 3))
    X = torch.randn(48, 2, 6, 6)
    units, _ = find_units(model.eval(), X[:2])
    assert units == [Unit("0", "3", 4, positions=16)]
    nc = NetworkCompressor(model, rank=1.0, tol=0.0).fit(X)
    np.testing.assert_allclose(nc.transform(X), model(X).detach().numpy(), atol=1e-5)
    small = NetworkCompressor(model, rank=0.5).fit(X).compressed_model_
    assert small[3].weight.shape == (2 * 16, 3)


def test_a_registered_fold_that_forgets_the_width_is_caught(transposed_kind):
    _surgery.KINDS_BY_TYPE[Transposed]._fold_in = lambda module, T: None
    with pytest.raises(ValueError, match="left 16 input channels where 8"):
        NetworkCompressor(_stack(), rank=0.5).fit(torch.randn(32, 6))


@pytest.mark.parametrize("options, match", [
    ({"in_width": 3}, "in_width must be callable"),
    ({"as_samples": "rows"}, "as_samples must be callable"),
])
def test_register_rejects_bad_arguments(options, match):
    arguments = dict(in_width=len, out_width=len, slice_out=_slice_out, fold_in=_fold_in)
    arguments.update(options)
    with pytest.raises(TypeError, match=match):
        skid.nn.register_layer_kind(Transposed, **arguments)
    with pytest.raises(TypeError, match="Module subclass"):
        skid.nn.register_layer_kind(object, in_width=len, out_width=len, slice_out=_slice_out,
                                    fold_in=_fold_in)


# ----------------------------------------------------------------------------------------
# Optional packages' kinds, by qualified class name: stand-ins with the same names show the
# mechanism without the packages (the real transformers Conv1D runs in test_groups_hf.py).

class Conv1D(nn.Module):
    """Hugging Face's GPT-2 Conv1D: weight (in, out), ``addmm`` in its forward."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) / nx ** 0.5)
        self.bias = nn.Parameter(torch.randn(nf))

    def forward(self, x):
        out = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return out.view(x.size()[:-1] + (self.nf,))


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's BatchNorm2d with its activation in its own forward."""

    def __init__(self, n):
        super().__init__(n)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(super().forward(x))


class Linear(nn.Linear):
    """timm's Linear: an nn.Linear whose forward casts the bias (for TorchScript)."""

    def forward(self, x):
        return F.linear(x, self.weight, self.bias.to(dtype=x.dtype))


Conv1D.__module__ = "transformers.pytorch_utils"
BatchNormAct2d.__module__ = "timm.layers.norm_act"
Linear.__module__ = "timm.layers.linear"


def test_hugging_face_conv1d_by_name():
    model = nn.Sequential(Conv1D(16, 6), nn.GELU(), Conv1D(3, 16)).eval()
    X = torch.randn(40, 5, 6)
    units, _ = find_units(model, X[:2])
    assert units == [Unit("0", "2", 16)]
    nc = NetworkCompressor(model, rank=1.0).fit(X)
    np.testing.assert_allclose(nc.transform(X), model(X).detach().reshape(40, -1).numpy(),
                               atol=1e-5)
    small = NetworkCompressor(model, rank=0.25).fit(X).compressed_model_
    assert small[0].weight.shape == (6, 4) and small[0].nf == 4
    assert small[2].weight.shape == (4, 3)


def test_timm_batchnorm_act_and_linear_by_name():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), BatchNormAct2d(8), nn.Conv2d(8, 4, 1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), Linear(4, 10), nn.ReLU(),
                          Linear(10, 2)).eval()
    model[1].running_var.uniform_(0.5, 1.5)
    X = torch.randn(40, 3, 6, 6)
    units, _ = find_units(model, X[:2])
    assert units == [Unit("0", "2", 8, ("1",)), Unit("2", "5", 4), Unit("5", "7", 10)]
    nc = NetworkCompressor(model, rank=1.0).fit(X)
    np.testing.assert_allclose(nc.transform(X), model(X).detach().numpy(), atol=1e-5)
    small = NetworkCompressor(model, rank=0.5).fit(X).compressed_model_
    assert small[1].num_features == 4 and small[5].out_features == 5


def test_optional_kinds_import_nothing():
    import subprocess
    import sys

    code = ("import sys, skid.nn; print(any(m.split('.')[0] in ('transformers', 'timm') "
            "for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
