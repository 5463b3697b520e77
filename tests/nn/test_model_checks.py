"""Models the compressor cannot work on get an error that says what to pass instead."""

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from skid import NetworkCompressor

from .models import make_mlp


def test_a_function_is_not_a_module():
    model = make_mlp()

    def forward(x):
        return model(x)

    with pytest.raises(TypeError, match="must be a torch.nn.Module; got the function .*forward"):
        NetworkCompressor(rank=0.5).fit(forward, torch.randn(8, 8))
    with pytest.raises(TypeError, match="got the function"):
        NetworkCompressor(forward, rank=0.5).fit(torch.randn(8, 8))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit is deprecated
def test_torchscript_is_not_supported():
    scripted = torch.jit.script(make_mlp())
    with pytest.raises(TypeError, match="TorchScript is not supported.*eager nn.Module"):
        NetworkCompressor(rank=0.5).fit(scripted, torch.randn(8, 8))


def test_an_exported_program_is_not_a_module():
    exported = torch.export.export(make_mlp(), (torch.randn(2, 8),))
    with pytest.raises(TypeError, match="got an object of type ExportedProgram"):
        NetworkCompressor(rank=0.5).fit(exported, torch.randn(8, 8))


def test_pruning_masks_must_be_removed_first():
    model = make_mlp()
    prune.l1_unstructured(model[0], "weight", amount=0.3)
    prune.random_unstructured(model[2], "bias", amount=0.5)
    before = copy.copy(model[0].weight_mask)
    with pytest.raises(ValueError, match=r"prune masks \(0.weight, 2.bias\).*prune.remove"):
        NetworkCompressor(rank=0.5).fit(model, torch.randn(8, 8))
    assert torch.equal(model[0].weight_mask, before)  # the caller's model keeps its masks
    prune.remove(model[0], "weight")
    prune.remove(model[2], "bias")
    nc = NetworkCompressor(rank=0.5).fit(model, torch.randn(8, 8))
    assert nc.layers_[0]["width_after"] == 8


def test_data_first_still_means_fit_x():
    nc = NetworkCompressor(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), rank=0.5)
    assert nc.fit(torch.randn(8, 4), None).layers_[0]["width_after"] == 4
