"""The content key of a model for ``memory=``: the code it runs, not its ``repr``."""

import copy

import numpy as np
import torch
from torch import nn

import skid
from skid import NetworkCompressor
from skid.nn._calibration import model_fingerprint
from skid.nn._fingerprint import describe_execution
from skid.nn._outputs import model_outputs


def net_class(activation, scale=2.0, second="fc2"):
    """A class named ``Net`` each time: same ``repr`` and ``state_dict`` keys, other code."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(8, 32)
            self.fc2 = nn.Linear(32, 4)
            self.fc3 = nn.Linear(32, 4)
            self.shift = torch.full((1,), scale)  # a plain attribute, not in the state_dict

        def forward(self, x):
            return getattr(self, second)(activation(self.fc1(x)) + self.shift)

    return Net


def twins(*variants):
    """One model per variant of ``net_class``, all with the weights of the first."""
    torch.manual_seed(0)
    models = [net_class(*variant)() for variant in variants]
    for model in models[1:]:
        model.load_state_dict(models[0].state_dict())
    return models


def test_an_edited_forward_changes_the_description():
    x = torch.randn(2, 8)
    relu, tanh, scaled, other_weight = twins(
        (torch.relu,), (torch.tanh,), (torch.relu, 3.0), (torch.relu, 2.0, "fc3")
    )
    assert repr(relu) == repr(tanh) == repr(scaled) == repr(other_weight)
    described = [describe_execution(m, (x,)) for m in (relu, tanh, scaled, other_weight)]
    assert len(set(described)) == 4
    assert "'fc2'" in described[0] and "'fc3'" in described[3]


def test_weights_used_directly_are_named():
    class Tied(nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name, self.a, self.b = name, nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return torch.nn.functional.linear(x, getattr(self, self.name).weight)

    x = torch.randn(2, 4)
    uses_a, uses_b = describe_execution(Tied("a"), (x,)), describe_execution(Tied("b"), (x,))
    assert "param:a.weight" in uses_a and "param:b.weight" in uses_b


def test_the_description_does_not_depend_on_objects():
    (model,) = twins((torch.relu,))
    x = torch.randn(2, 8)
    first = describe_execution(model, (x,))
    assert describe_execution(copy.deepcopy(model), (x.clone(),)) == first
    assert describe_execution(net_class(torch.relu)(), (torch.randn(2, 8),)) == first
    model.train()
    assert "0x" not in describe_execution(model, (x,), {})
    assert model.training  # the flags are restored


def test_the_fingerprint_holds_the_package_version(monkeypatch):
    (model,) = twins((torch.relu,))
    x = torch.randn(2, 8)
    before = model_fingerprint(model, (x,))
    monkeypatch.setattr(skid, "__version__", skid.__version__ + ".post1")
    assert model_fingerprint(model, (x,)) != before


def test_memory_does_not_reuse_statistics_or_outputs_across_an_edited_forward(tmp_path):
    relu, tanh = twins((torch.relu,), (torch.tanh,))
    X, X_test = torch.randn(64, 8), torch.randn(16, 8)
    params = dict(rank=0.5, batch_size=32)
    first = NetworkCompressor(relu, memory=tmp_path, **params).fit(X)
    first.score(X_test)  # caches the relu model's outputs on X_test
    cached = NetworkCompressor(tanh, memory=tmp_path, **params).fit(X)
    fresh = NetworkCompressor(tanh, **params).fit(X)
    assert first.n_calibration_passes_ == cached.n_calibration_passes_ == 2
    assert cached.layers_ == fresh.layers_
    np.testing.assert_array_equal(cached.transform(X_test), fresh.transform(X_test))
    np.testing.assert_array_equal(
        cached._original_outputs(X_test), model_outputs(tanh, X_test, 32)
    )
    assert cached.score(X_test) == fresh.score(X_test)
    again = NetworkCompressor(copy.deepcopy(tanh), memory=tmp_path, **params).fit(X)
    assert again.n_calibration_passes_ == 0  # the same code and weights still hit the cache


def test_memory_set_after_fit_keys_the_outputs_on_the_code_too(tmp_path):
    relu, tanh = twins((torch.relu,), (torch.tanh,))
    X = torch.randn(16, 8)
    for model in (relu, tanh):
        nc = NetworkCompressor(model, rank=0.5).fit(X).set_params(memory=tmp_path)
        np.testing.assert_array_equal(nc._original_outputs(X), model_outputs(model, X, 256))
