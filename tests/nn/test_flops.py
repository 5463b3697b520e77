"""Tests for skid.nn._flops: hand-computed FLOPs per sample and parameter counts."""

import numpy as np
import pytest
import torch
from torch import nn

from skid.nn._flops import count_flops, count_params
from skid.nn._plan import Selection, Unit
from skid.nn._surgery import apply_selection

from .models import make_bert_layer, make_text_input


def _mlp():
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def _cnn():
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.Flatten(), nn.Linear(4 * 5 * 5, 2))


@pytest.mark.parametrize("batch", [1, 5])
def test_mlp_flops_by_hand(batch):
    total, per_module = count_flops(_mlp(), torch.randn(batch, 8))
    assert per_module == {"0": 2 * 8 * 16, "2": 2 * 16 * 4}  # 2 FLOPs per multiply-add
    assert total == 2 * (8 * 16 + 16 * 4)


def test_cnn_flops_by_hand():
    total, per_module = count_flops(_cnn(), (torch.randn(3, 3, 5, 5),))
    conv = 2 * (4 * 5 * 5) * (3 * 3 * 3)  # outputs × (in_channels × kernel) MACs
    depthwise = 2 * (4 * 5 * 5) * (3 * 3)  # one filter per channel
    linear = 2 * 100 * 2
    assert per_module == {"0": conv, "3": depthwise, "5": linear}
    assert total == conv + depthwise + linear == 7600


def test_conv1d_and_conv3d_flops_by_hand():
    model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Flatten(), nn.Unflatten(1, (3, 1, 1, 4)),
                          nn.Conv3d(3, 5, 1))
    _, per_module = count_flops(model, torch.randn(2, 2, 6))
    assert per_module == {"0": 2 * (3 * 4) * (2 * 3), "3": 2 * (5 * 4) * 3}


def test_keyword_inputs_and_attention():
    model = make_bert_layer()
    total, per_module = count_flops(model, (), make_text_input(n=3, length=6))
    seq, hidden, inter = 6, 16, 32
    assert per_module["encoder.layer.0.intermediate.dense"] == 2 * seq * hidden * inter
    assert per_module["pooler.dense"] == 2 * hidden * hidden  # one token
    attention = 2 * 2 * seq * seq * hidden  # scores and context, per layer
    assert total == sum(per_module.values()) + 2 * attention


def test_module_called_twice_counts_both_calls():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(self.fc(x))

    total, per_module = count_flops(Twice(), torch.randn(2, 4))
    assert per_module == {"fc": 2 * 2 * 16} and total == 64


def test_flops_scale_with_kept_channels():
    """A producer keeps k/m of its FLOPs, a depthwise passthrough k/m, a consumer k/m."""
    model = _cnn().eval()
    x = torch.randn(2, 3, 5, 5)
    _, before = count_flops(model, x)
    unit = Unit("0", "5", 4, ("1", "3"), positions=25)
    keep = np.array([0, 2, 3])
    T = np.eye(4)[keep]
    apply_selection(model, Selection(unit, keep, T, 0.0))
    _, after = count_flops(model, x)
    assert after == {name: flops * 3 // 4 for name, flops in before.items()}


def test_training_flags_restored():
    model = _cnn().train()
    count_flops(model, torch.randn(2, 3, 5, 5))
    assert all(m.training for m in model.modules())


def test_count_params():
    assert count_params(_mlp()) == 8 * 16 + 16 + 16 * 4 + 4
    tied = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    tied[1].weight = tied[0].weight
    assert count_params(tied) == 16 + 4 + 4
