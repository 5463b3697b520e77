"""Tests for skid.nn._graph: units found by following the forward pass, and skip reasons."""

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from skid.nn._graph import find_units
from skid.nn._plan import ChannelGroup, Consumer, Unit

from .models import ARCHITECTURES, call_args, make_bert_layer, make_text_input, make_unprunable


def _find(model, batch, **options):
    args, kwargs = call_args(batch)
    return find_units(model, args, kwargs, **options)


def _reasons(skipped):
    return {s.producer: s.reason for s in skipped}


_BERT_UNITS = [
    Unit("encoder.layer.0.intermediate.dense", "encoder.layer.0.output.dense", 32),
    Unit("encoder.layer.1.intermediate.dense", "encoder.layer.1.output.dense", 32),
    Unit("pooler.dense", "classifier", 16),
]
_VGG_UNITS = [
    Unit("features.0", "features.4", 8, ("features.1",)),
    Unit("features.4", "features.8", 12, ("features.5",)),
    Unit("features.8", "classifier.0", 16, ("features.9",), positions=4),
    Unit("classifier.0", "classifier.3", 24),
    Unit("classifier.3", "classifier.6", 20),
]
_EXPECTED = {
    "mlp": [Unit("0", "2", 16), Unit("2", "5", 12)],
    "cnn1d": [Unit("0", "3", 8, ("1",)), Unit("3", "7", 6)],
    "cnn2d": [Unit("0", "3", 8), Unit("3", "7", 6, ("4",), positions=4)],
    "cnn3d": [Unit("0", "2", 6), Unit("2", "7", 5, ("3",), positions=8)],
    "vgg": _VGG_UNITS,
    "vgg_view": _VGG_UNITS,
    "resnet_basic": [Unit("layer1.0.conv1", "layer1.0.conv2", 8, ("layer1.0.bn1",)),
                     Unit("layer1.1.conv1", "layer1.1.conv2", 12, ("layer1.1.bn1",))],
    "resnet_bottleneck": [
        Unit("layer1.0.conv1", "layer1.0.conv2", 2, ("layer1.0.bn1",)),
        Unit("layer1.0.conv2", "layer1.0.conv3", 2, ("layer1.0.bn2",)),
        Unit("layer1.1.conv1", "layer1.1.conv2", 3, ("layer1.1.bn1",)),
        Unit("layer1.1.conv2", "layer1.1.conv3", 3, ("layer1.1.bn2",))],
    "mobilenetv2_residual": [
        Unit("block.expand", "block.project", 24, ("block.bn1", "block.depthwise", "block.bn2")),
        Unit("head.0", "classifier.1", 16, ("head.1",))],
    "mobilenetv2_plain": [
        Unit("stem.0", "block.expand", 6, ("stem.1",)),
        Unit("block.expand", "block.project", 24, ("block.bn1", "block.depthwise", "block.bn2")),
        Unit("block.project", "head.0", 8, ("block.bn3",)),
        Unit("head.0", "classifier.1", 16, ("head.1",))],
    "bert": _BERT_UNITS,
    "bert_new_gelu": _BERT_UNITS,
}


def test_expected_units_cover_every_architecture():
    assert set(_EXPECTED) == set(ARCHITECTURES)


def test_units_of_every_architecture(architecture):
    name, model, batch = architecture
    units, skipped = _find(model, batch)
    assert units == _EXPECTED[name]
    found = {u.producer for u in units}
    assert not found & {s.producer for s in skipped}
    every = {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))
             and getattr(m, "groups", 1) == 1}
    assert every <= found | {s.producer for s in skipped}  # every candidate is accounted for


@pytest.mark.parametrize("name, producer, reason", [
    ("resnet_basic", "conv1", "`add` with another tensor .* residual"),
    ("resnet_basic", "layer1.0.conv2", "residual"),
    ("resnet_basic", "layer1.1.downsample.0", "residual"),
    ("resnet_bottleneck", "layer1.0.conv3", "residual"),
    ("mobilenetv2_residual", "block.project", "residual"),
    ("mobilenetv2_residual", "stem.0", "residual"),
    ("mlp", "5", "model output"),
    ("bert", "encoder.layer.0.attention.self.query", r"view.*\(2, 6, 16\) to \(2, 6, 2, 8\)"),
    ("bert", "encoder.layer.1.attention.self.value", "not a channel-major flatten"),
    ("bert", "encoder.layer.0.output.dense", "residual"),
    ("bert", "encoder.layer.0.attention.output.dense", "residual"),
    ("bert", "classifier", "model output"),
])
def test_skip_reasons(name, producer, reason):
    factory, make_input = ARCHITECTURES[name]
    _, skipped = _find(factory(), make_input())
    assert producer in _reasons(skipped)
    assert re.search(reason, _reasons(skipped)[producer]), _reasons(skipped)[producer]


# ----------------------------------------------------------------------------------------
# Small models for the rules

class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)
        self.c = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.c(torch.cat([F.relu(self.a(x)), self.b(x)], dim=1))


class ConcatOtherAxis(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)
        self.token = nn.Parameter(torch.randn(1, 4, 1, 4))

    def forward(self, x):
        return self.c(torch.cat([self.token.expand(len(x), -1, -1, -1), self.a(x)], dim=2))


class ConcatTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        h = self.a(x)
        return self.c(torch.cat([h, h], dim=1))


class SharedModule(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(torch.relu(self.fc(torch.relu(self.fc(x)))))


class TiedWeights(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2)
        self.fc2.weight = self.fc1.weight

    def forward(self, x):
        return self.head(self.fc2(torch.relu(self.fc1(x))))


class WeightUsedDirectly(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return F.linear(torch.relu(self.fc2(torch.relu(self.fc1(x)))), self.fc1.weight)


class TwoConsumers(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(8, 8), nn.Linear(8, 2), nn.Linear(8, 2)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        return self.fc2(h) + self.fc3(h)


class ChannelsLastFlatten(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4 * 16, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).permute(0, 2, 3, 1).flatten(1))


class LinearSubclass(nn.Linear):
    def forward(self, x):  # an overridden forward is an unknown op
        return super().forward(x) * 2


class TransposeToConv1d(nn.Module):
    """Linear on (B, S, C), transpose to (B, C, S), Conv1d: a unit across kinds."""

    def __init__(self):
        super().__init__()
        self.fc, self.conv = nn.Linear(4, 6), nn.Conv1d(6, 3, 3)

    def forward(self, x):
        return self.conv(F.silu(self.fc(x)).transpose(1, 2)).sum(dim=(1, 2))


class GlobalMean(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 5, 3), nn.Linear(5, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean([2, 3]))


class ScalarOps(nn.Module):
    """Elementwise ops with scalars and per-sample masks keep the channels."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x, mask):
        h = self.fc1(x)
        h = h * torch.sigmoid(h) * 2.0 + 1.0
        return self.fc2(h * mask[..., None])


class NotCalled(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.unused = nn.Linear(4, 6), nn.Linear(6, 2), nn.Linear(4, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _seq(*layers):
    return nn.Sequential(*layers).eval()


@pytest.mark.parametrize("model, x, producer, reason", [
    (ConcatOtherAxis(), torch.randn(2, 3, 4, 4), "a", "concatenated with other tensors"),
    (ConcatTwice(), torch.randn(2, 3, 4, 4), "a", "concatenated with themselves"),
    (SharedModule(), torch.randn(2, 8), "fc", "called 2 times"),
    (TiedWeights(), torch.randn(2, 8), "fc1", "shares parameters with 'fc2'"),
    (TiedWeights(), torch.randn(2, 8), "fc2", "shares parameters with 'fc1'"),
    (WeightUsedDirectly(), torch.randn(2, 8), "fc1", "use directly"),
    (ChannelsLastFlatten(), torch.randn(2, 3, 4, 4), "conv", "not a channel-major flatten"),
    (_seq(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 8, 3, groups=4), nn.Conv2d(8, 2, 1)),
     torch.randn(2, 3, 4, 4), "0", "grouped convolution"),
    (_seq(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2)), torch.randn(2, 4), "0",
     "LayerNorm '1', which mixes channels"),
    (_seq(nn.Conv2d(3, 4, 1), nn.GroupNorm(2, 4), nn.Conv2d(4, 2, 1)), torch.randn(2, 3, 4, 4),
     "0", "GroupNorm"),
    (_seq(nn.Linear(4, 8), nn.Softmax(dim=-1), nn.Linear(8, 2)), torch.randn(2, 4), "0",
     "Softmax"),
    (_seq(nn.Linear(4, 8), nn.MaxPool1d(2), nn.Linear(4, 2)), torch.randn(2, 4), "0",
     "pools over the channel axis"),
    (_seq(nn.Linear(4, 8), LinearSubclass(8, 2)), torch.randn(2, 4), "0", "`linear`"),
    (_seq(nn.Linear(4, 8), nn.Linear(8, 2)), torch.randn(2, 4), "1", "model output"),
    (NotCalled(), torch.randn(2, 4), "unused", "not called"),
])
def test_blocked(model, x, producer, reason):
    units, skipped = find_units(model.eval(), (x,))
    assert producer not in {u.producer for u in units}
    assert reason in _reasons(skipped)[producer]


def test_functional_per_channel_bias_blocks():
    """A tensor that varies along the channels would need slicing too: blocked."""
    class Bias(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 2)
            self.shift = nn.Parameter(torch.randn(6))

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)) + self.shift)

    units, skipped = find_units(Bias(), torch.randn(3, 4))
    assert units == []
    assert "`add` with another tensor that varies along the channels" in _reasons(skipped)["fc1"]


def test_internal_error_while_following_is_a_skip(monkeypatch):
    import skid.nn._channel_walk as walk_module

    def broken(*args):
        raise RuntimeError("boom")

    monkeypatch.setattr(walk_module, "_check_linear_consumer", broken)
    units, skipped = find_units(ARCHITECTURES["mlp"][0](), torch.randn(2, 8))
    assert units == []
    assert _reasons(skipped)["0"] == "skid could not follow its channels (boom)"


def test_unknown_op_blocks():
    class Cumsum(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 2)

        def forward(self, x):
            return self.fc2(torch.cumsum(self.fc1(x), dim=0))

    units, skipped = find_units(Cumsum(), torch.randn(3, 4))
    assert units == []
    assert "`cumsum`, which skid does not know" in _reasons(skipped)["fc1"]


@pytest.mark.parametrize("model, args, expected", [
    (TransposeToConv1d(), (torch.randn(2, 5, 4),), Unit("fc", "conv", 6)),
    (GlobalMean(), (torch.randn(2, 3, 5, 5),), Unit("conv", "fc", 5)),
    (ScalarOps(), (torch.randn(2, 3, 4), torch.ones(2, 3)), Unit("fc1", "fc2", 6)),
    (_seq(nn.Linear(4, 8), nn.PReLU(8), nn.Linear(8, 2)), (torch.randn(2, 4),),
     Unit("0", "2", 8, ("1",))),
    (_seq(nn.Linear(4, 8), nn.PReLU(), nn.Linear(8, 2)), (torch.randn(2, 4),), Unit("0", "2", 8)),
    (_seq(nn.Conv1d(2, 4, 3), nn.InstanceNorm1d(4, affine=True), nn.Conv1d(4, 2, 1)),
     (torch.randn(2, 2, 6),), Unit("0", "2", 4, ("1",))),
    (_seq(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 1, groups=2), nn.Flatten()),
     (torch.randn(2, 3, 4, 4),), ChannelGroup(("0",), (Consumer("2"),), 4, blocks=2)),
    (_seq(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2)), (torch.randn(3, 4),),
     Unit("0", "3", 8, ("1",))),
    (_seq(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Unflatten(1, (4, 4)), nn.Flatten(),
          nn.Linear(16, 2)), (torch.randn(2, 3, 4, 4),), Unit("0", "5", 4, positions=4)),
])
def test_followed_through(model, args, expected):
    units, _ = find_units(model.eval(), args)
    assert units[0] == expected


def test_concatenated_parts_are_groups_at_their_offsets():
    units, _ = find_units(Concat().eval(), torch.randn(2, 3, 4, 4))
    assert [(u.producer, u.consumers[0].before) for u in units] == [("a", (0,)), ("b", ("a",))]


def test_in_place_activation_and_functional_residual():
    """ReLU(inplace=True) and ``out += identity`` are tracked as new values of one tensor."""
    model = ARCHITECTURES["resnet_basic"][0]()
    units, _ = find_units(model, torch.randn(2, 3, 8, 8))
    assert [u.producer for u in units] == ["layer1.0.conv1", "layer1.1.conv1"]


# ----------------------------------------------------------------------------------------
# HF-style control flow, outputs and inputs

@pytest.mark.parametrize("with_mask", [True, False])
@pytest.mark.parametrize("return_dict", [True, False])
def test_bert_control_flow_and_outputs(with_mask, return_dict):
    model = make_bert_layer()
    batch = make_text_input()
    kwargs = {"input_ids": batch["input_ids"], "return_dict": return_dict}
    if with_mask:
        kwargs["attention_mask"] = batch["attention_mask"]
    units, _ = find_units(model, (), kwargs)
    assert units == _BERT_UNITS


def test_hidden_state_output_blocks_pooler():
    """A model that also returns the pooled output cannot prune the pooler."""
    class WithPooled(nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = make_bert_layer()

        def forward(self, **batch):
            hidden = self.bert(**batch).last_hidden_state
            pooled = self.bert.pooler(hidden[:, 0])
            return {"logits": self.bert.classifier(pooled), "pooled": pooled}

    units, skipped = find_units(WithPooled().eval(), (), make_text_input())
    assert "bert.pooler.dense" in _reasons(skipped)
    assert "bert.pooler.dense" not in {u.producer for u in units}


# ----------------------------------------------------------------------------------------
# layers / exclude

def _vgg():
    factory, make_input = ARCHITECTURES["vgg"]
    return factory(), make_input()


def test_layers_restricts_to_producers_and_pairs():
    model, x = _vgg()
    units, skipped = find_units(model, x, layers=["features.4", ("classifier.0", "classifier.3")])
    assert [u.producer for u in units] == ["features.4", "classifier.0"]
    assert _reasons(skipped)["features.0"] == "not listed in `layers`"


def test_layers_pair_with_wrong_consumer():
    model, x = _vgg()
    units, skipped = find_units(model, x, layers=[("features.0", "features.8")])
    assert units == []
    assert "feed 'features.4'" in _reasons(skipped)["features.0"]


def test_layers_producer_that_is_not_prunable_is_reported():
    model, x = _vgg()
    units, skipped = find_units(model, x, layers=["classifier.6"])
    assert units == []
    assert "model output" in _reasons(skipped)["classifier.6"]


def test_exclude_drops_units_touching_the_module():
    model, x = _vgg()
    units, skipped = find_units(model, x, exclude=["features.5", "classifier.6"])
    producers = [u.producer for u in units]
    assert "features.4" not in producers  # features.5 is its passthrough
    assert "classifier.3" not in producers  # classifier.6 is its consumer
    assert "features.0" in producers
    assert "'features.5' is in `exclude`" in _reasons(skipped)["features.4"]
    assert [s.producer for s in skipped] == ["features.4", "classifier.3", "classifier.6"]


def test_exclude_a_container():
    model = make_bert_layer()
    units, skipped = find_units(model, (), make_text_input(), exclude=["encoder.layer.1"])
    assert [u.producer for u in units] == ["encoder.layer.0.intermediate.dense", "pooler.dense"]
    assert "inside 'encoder.layer.1'" in _reasons(skipped)["encoder.layer.1.intermediate.dense"]


@pytest.mark.parametrize("option, value, match", [
    ("layers", ["featurs.0"], "no module 'featurs.0'; did you mean 'features.0'"),
    ("layers", [("features.0", "classifer.0")], "did you mean 'classifier.0'"),
    ("exclude", ["classifer"], "did you mean 'classifier'"),
    ("layers", ["features.1"], "'features.1' is a BatchNorm2d, not a Linear or Conv"),
])
def test_bad_names(option, value, match):
    model, x = _vgg()
    with pytest.raises(ValueError, match=match):
        find_units(model, x, **{option: value})


def test_bad_layers_type():
    model, x = _vgg()
    with pytest.raises(TypeError, match="layers must be"):
        find_units(model, x, layers=[3])


# ----------------------------------------------------------------------------------------
# The caller's model and errors

def test_model_state_and_flags_unchanged():
    model, x = _vgg()
    model.train()
    model.classifier.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    find_units(model, x)
    assert model.training and model.features.training and not model.classifier.training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_forward_failure_is_a_value_error():
    model, _ = _vgg()
    with pytest.raises(ValueError, match="forward pass on the example input failed"):
        find_units(model, torch.randn(2, 5, 16, 16))


@pytest.mark.parametrize("kind, x, producer, reason", [
    ("linear", torch.randn(2, 8), "0", "model output"),
    ("residual", torch.randn(2, 3, 8, 8), "conv", "residual"),
])
def test_unprunable(kind, x, producer, reason):
    units, skipped = find_units(make_unprunable(kind=kind), x)
    assert units == []
    assert reason in _reasons(skipped)[producer]
