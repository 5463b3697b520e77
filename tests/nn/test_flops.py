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


def _encoder(layers=2, d=32, heads=4, ff=64):
    layer = nn.TransformerEncoderLayer(d_model=d, nhead=heads, dim_feedforward=ff,
                                       batch_first=True)
    return nn.TransformerEncoder(layer, num_layers=layers, enable_nested_tensor=False).eval()


def _attention_by_hand(seq, d, ff, layers):
    """Per sample: in-projection (q, k, v), scores QKᵀ, scores × V, out-projection, FFN."""
    attention = 2 * seq * d * 3 * d + 2 * (2 * seq * seq * d) + 2 * seq * d * d
    return layers * (attention + 2 * (2 * seq * d * ff))


@pytest.mark.parametrize("need_weights", [True, False])
def test_transformer_encoder_counts_its_attention(need_weights):
    """nn.MultiheadAttention's fused fast path (eval, no_grad) is counted op by op."""
    seq, d, ff = 10, 32, 64
    total, per_module = count_flops(_encoder(), torch.randn(3, seq, d))
    assert total == _attention_by_hand(seq, d, ff, layers=2) == 353280
    assert per_module["layers.0.linear1"] == 2 * seq * d * ff
    mha = nn.MultiheadAttention(d, 4, batch_first=True).eval()

    class SelfAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = mha

        def forward(self, x):
            return self.mha(x, x, x, need_weights=need_weights)[0]

    total, per_module = count_flops(SelfAttention(), torch.randn(2, seq, d), own=["mha"])
    assert total == per_module["mha"] == 2 * seq * d * 4 * d + 4 * seq * seq * d
    assert torch.backends.mha.get_fastpath_enabled()  # switched back on


def test_compressor_flops_include_the_transformer_encoders_attention():
    from skid.nn import NetworkCompressor

    seq, d, ff = 6, 32, 64
    model = _encoder(layers=1, d=d, ff=ff)
    nc = NetworkCompressor(model, rank=0.5, prune="channels").fit(torch.randn(40, seq, d))
    kept = nc.layers_[0]["width_after"]
    assert nc.flops_["before"] == _attention_by_hand(seq, d, ff, layers=1)
    assert nc.flops_["after"] == _attention_by_hand(seq, d, kept, layers=1)


def test_hugging_face_attention_scores_are_counted_pruned_or_not():
    """The CPU kernel of scaled_dot_product_attention (HF's default) is counted, from the
    shapes that run: fewer heads after pruning, fewer scores."""
    pytest.importorskip("transformers")
    from skid.nn import NetworkCompressor

    from .hf_models import HF_MODELS, HIDDEN

    factory, make_input = HF_MODELS["llama"]
    model, batch = factory().eval(), make_input(n=2)
    seq, layers, heads, head_dim = batch["input_ids"].shape[1], 2, 4, HIDDEN // 4
    total, per_module = count_flops(model, (), batch)
    assert total - sum(per_module.values()) == layers * 2 * (2 * seq * seq * heads * head_dim)
    nc = NetworkCompressor(model, prune="heads", rank=0.5).fit(
        [make_input(n=8, seed=s) for s in range(3)])
    compressed_total, compressed_modules = count_flops(nc.compressed_model_, (), batch)
    kept = sum(row["width_after"] for row in nc.layers_)
    assert nc.flops_["after"] == compressed_total
    assert compressed_total - sum(compressed_modules.values()) == (
        2 * (2 * seq * seq * kept * head_dim))
