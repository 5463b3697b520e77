"""Channel groups: fan-outs, gated MLPs and SE gates found, calibrated and applied exactly."""

import io

import numpy as np
import pytest
import torch
from torch import nn

from skid.nn import NetworkCompressor
from skid.nn._batches import Batches
from skid.nn._calibration import unit_statistics
from skid.nn._graph import find_units
from skid.nn._joint import JointFactorization
from skid.nn._plan import ChannelGroup, Consumer, Unit

from .blocks import BLOCKS, make_block


def _reasons(skipped):
    return {s.producer: s.reason for s in skipped}


def _names(units):
    return [(u.producers, tuple((c.name, c.reads) for c in u.consumers)) for u in units]


def relative_gap(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


_EXPECTED = {
    "resnet50_stem": [
        (("conv1",), (("layer1.0.downsample.0", 0), ("layer1.0.conv1", 0))),
        (("layer1.0.conv1",), (("layer1.0.conv2", 0),)),
        (("layer1.0.conv2",), (("layer1.0.conv3", 0),)),
        (("fc.0",), (("fc.2", 0),))],
    "resnext": [
        (("conv1",), (("layer1.0.downsample.0", 0), ("layer1.0.conv1", 0))),
        (("layer1.0.conv1",), (("layer1.0.conv2", 0),)),
        (("layer1.0.conv2",), (("layer1.0.conv3", 0),)),
        (("fc.0",), (("fc.2", 0),))],
    "mbconv_se": [
        (("expand.0", "se.fc2"), (("se.fc1", 0), ("project.0", 1))),
        (("se.fc1",), (("se.fc2", 0),)),
        (("head.0",), (("head.5", 0),))],
    "densenet": [
        (("conv0",), (("layer1.conv1", 0), ("layer2.conv1", 1), ("transition.2", 2))),
        (("layer1.conv1",), (("layer1.conv2", 0),)),
        (("layer1.conv2",), (("layer2.conv1", 0), ("transition.2", 1))),
        (("layer2.conv1",), (("layer2.conv2", 0),)),
        (("layer2.conv2",), (("transition.2", 0),)),
        (("transition.2",), (("classifier", 0),))],
    "inception": [
        (("stem.0",), (("branch1.0", 0), ("branch2.0", 0), ("branch3.0", 0), ("branch4.1", 1))),
        (("branch1.0",), (("fc", 0),)),
        (("branch2.0",), (("branch2.3", 0),)),
        (("branch2.3",), (("fc", 0),)),
        (("branch3.0",), (("branch3.3", 0),)),
        (("branch3.3",), (("fc", 0),)),
        (("branch4.1",), (("fc", 0),))],
    "fire": [
        (("stem.0",), (("squeeze", 0),)),
        (("squeeze",), (("expand1x1", 0), ("expand3x3", 0))),
        (("expand1x1",), (("classifier.0", 0),)),
        (("expand3x3",), (("classifier.0", 0),))],
    "gated_mlp": [(("gate_proj", "up_proj"), (("down_proj", 0),))],
}

_SKIPPED = {
    "resnet50_stem": {"layer1.0.downsample.0": "residual", "layer1.0.conv3": "residual",
                      "fc.2": "model output"},
    "resnext": {"layer1.0.conv3": "residual", "layer1.0.downsample.0": "residual"},
    "mbconv_se": {"stem.0": "residual", "project.0": "residual"},
    "densenet": {"classifier": "model output"},
    "inception": {"fc": "model output"},
    "fire": {"classifier.0": "model output"},
    "gated_mlp": {"embed": "RMSNorm 'norm', which mixes channels", "down_proj": "residual"},
}


def test_every_block_has_expectations():
    assert set(_EXPECTED) == set(BLOCKS) == set(_SKIPPED)


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_groups_found(name):
    units, skipped = find_units(make_block(name), BLOCKS[name][1]())
    assert _names(units) == _EXPECTED[name]
    reasons = _reasons(skipped)
    for producer, reason in _SKIPPED[name].items():
        assert reason in reasons[producer], reasons[producer]
    grouped = {p for u in units for p in u.producers}
    assert not grouped & set(reasons)  # a producer is in one group or skipped, never both


def test_group_record_details():
    """The SE group slices the expand conv's BN and the depthwise conv with the channels."""
    units, _ = find_units(make_block("mbconv_se"), BLOCKS["mbconv_se"][1]())
    se = units[0]
    assert se.width == 32 and se.n_readings == 2
    assert se.passthroughs == ("expand.1", "depthwise.0", "depthwise.1")
    assert (se.producer, se.consumer) == ("expand.0", "se.fc1")


def test_unit_is_the_one_producer_one_consumer_group():
    assert Unit("a", "b", 4, ("bn",), positions=3) == ChannelGroup(
        ("a",), (Consumer("b", 3, 0),), 4, ("bn",))


@pytest.mark.parametrize("name", sorted(BLOCKS))
@pytest.mark.parametrize("options", [{"rank": 1.0}, {"tol": 0.0}])
def test_full_rank_reproduces_every_block(name, options):
    make_input = BLOCKS[name][1]
    nc = NetworkCompressor(make_block(name), batch_size=16, **options).fit(make_input(48, seed=1))
    held_out = make_input(16, seed=2)
    assert relative_gap(nc.transform(held_out), nc._original_outputs(held_out)) < 1e-5


def test_layers_rows_name_every_producer_and_consumer():
    nc = NetworkCompressor(make_block("mbconv_se"), rank=0.5).fit(BLOCKS["mbconv_se"][1](32))
    row = nc.layers_[0]
    assert row["kind"] == "channels"
    assert row["producers"] == ["expand.0", "se.fc2"]
    assert row["consumers"] == ["se.fc1", "project.0"]
    assert (row["producer"], row["consumer"]) == ("expand.0", "se.fc1")
    assert (row["width_before"], row["width_after"]) == (32, 16)
    model = nc.compressed_model_
    assert model.expand[0].out_channels == model.se.fc2.out_channels == 16
    assert model.depthwise[0].groups == model.expand[1].num_features == 16
    assert model.se.fc1.in_channels == model.project[0].in_channels == 16


def test_fan_out_shares_one_statistic():
    """Two consumers of one tensor: one statistic, the same T folded into both."""
    model = make_block("fire")
    X = BLOCKS["fire"][1](24)
    units, _ = find_units(model, X[:2])
    (fac,), _ = unit_statistics(model, units[1:2], Batches(X, 8))
    assert not isinstance(fac, JointFactorization)
    nc = NetworkCompressor(model, rank=0.5).fit(X)
    small = nc.compressed_model_
    assert small.squeeze.out_channels == small.expand1x1.in_channels == 3
    assert small.expand3x3.in_channels == 3


def _consumer_inputs(model, names, X):
    """The inputs of the named modules on X, as (rows, channels) matrices."""
    from skid.nn._surgery import as_samples

    seen = {}
    modules = dict(model.named_modules())

    def keep(name):
        def hook(module, args):
            seen[name] = as_samples(module, args[0]).double()
        return hook

    handles = [modules[n].register_forward_pre_hook(keep(n)) for n in names]
    with torch.no_grad():
        model(X)
    for handle in handles:
        handle.remove()
    return [seen[n] for n in names]


def test_each_consumer_gets_its_own_least_squares_fold():
    """SE gate: fc1 reads the pooled tensor, the projection the gated one; each T_c is the
    least-squares fit of its own input from the kept channels, and J serves both."""
    model = make_block("mbconv_se")
    X = BLOCKS["mbconv_se"][1](64, seed=3)
    units, _ = find_units(model, X[:2])
    se = units[0]
    (fac,), _ = unit_statistics(model, [se], Batches(X, 16), method="qr")
    assert isinstance(fac, JointFactorization)
    keep, _ = fac.select(12)
    T_fc1, T_project = fac.interpolations(keep)
    Z_fc1, Z_project = _consumer_inputs(model, ["se.fc1", "project.0"], X)
    for Z, T in ((Z_fc1, T_fc1), (Z_project, T_project)):
        Zk = Z[:, torch.as_tensor(keep)]
        best = torch.linalg.lstsq(Zk, Z).solution
        ours = torch.as_tensor(T)
        assert torch.linalg.norm(Z - Zk @ ours) <= torch.linalg.norm(Z - Zk @ best) * (1 + 1e-6)
    assert not np.allclose(T_fc1, T_project)
    # the error curve is the RMS of the readings' relative errors with one shared T
    _, T = fac.select(12)
    T = torch.as_tensor(T)
    shared = [float(torch.linalg.norm(Z - Z[:, torch.as_tensor(keep)] @ T) / torch.linalg.norm(Z))
              for Z in (Z_fc1, Z_project)]
    assert fac.errors[12] == pytest.approx(np.sqrt(np.mean(np.square(shared))), rel=1e-6)


def test_gate_with_a_foreign_tensor_is_blocked():
    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 2)
            self.scale = nn.Parameter(torch.randn(6))

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)) * torch.tanh(self.scale * x.sum()))

    units, skipped = find_units(Gate().eval(), torch.randn(3, 4))
    assert units == []
    assert "not made by a Linear/Conv layer" in _reasons(skipped)["fc1"]


def test_blocked_gate_blocks_both_producers():
    """A gated MLP whose product also reaches the output: both producers are skipped."""
    class Leaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate, self.up, self.down = nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(6, 2)

        def forward(self, x):
            h = torch.relu(self.gate(x)) * self.up(x)
            return self.down(h), h

    units, skipped = find_units(Leaky().eval(), torch.randn(3, 4))
    assert units == []
    assert "model output" in _reasons(skipped)["gate"]
    assert "model output" in _reasons(skipped)["up"]


def test_residual_sum_of_two_producers_stays_blocked():
    """``add`` of two producers' channels is a residual connection: left for a later step."""
    class TwoBranches(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(6, 2)

        def forward(self, x):
            return self.c(torch.relu(self.a(x) + self.b(x)))

    units, skipped = find_units(TwoBranches().eval(), torch.randn(3, 4))
    assert units == []
    assert "residual" in _reasons(skipped)["a"]


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_compressed_block_saves_and_loads(name):
    nc = NetworkCompressor(make_block(name), rank=0.5).fit(BLOCKS[name][1](32))
    buffer = io.BytesIO()
    torch.save(nc.compressed_model_, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    x = BLOCKS[name][1](4, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), nc.compressed_model_(x))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_compressed_block_exports(name):
    make_input = BLOCKS[name][1]
    nc = NetworkCompressor(make_block(name), rank=0.5).fit(make_input(32))
    x = make_input(2, seed=5)
    exported = torch.export.export(nc.compressed_model_, (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), nc.compressed_model_(x))


def test_concatenation_offsets():
    """DenseNet: each part of a concatenation at its offset, named by what precedes it."""
    units, _ = find_units(make_block("densenet"), BLOCKS["densenet"][1]())
    second = units[2]  # layer1.conv2's new features, after conv0's 8 channels
    assert [c.before for c in second.consumers] == [("conv0",), ("conv0",)]
    assert second.offsets == (("layer2.norm1", ("conv0",)), ("transition.0", ("conv0",)))
    first = units[0]  # conv0's channels open every concatenation
    assert [c.before for c in first.consumers] == [(0,), (0,), (0,)]


@pytest.mark.parametrize("name", ["densenet", "inception", "fire"])
@pytest.mark.parametrize("options", [{"calibration": "sequential", "rank": 1.0},
                                     {"calibration": "sequential", "rank": 0.5},
                                     {"target_flops": 0.5}])
def test_concatenations_compress_in_any_order(name, options):
    """Offsets follow the parts pruned before (sequential calibration, greedy widths)."""
    make_input = BLOCKS[name][1]
    X = make_input(48, seed=1)
    nc = NetworkCompressor(make_block(name), batch_size=16, **options).fit(X)
    held_out = make_input(16, seed=2)
    gap = relative_gap(nc.transform(held_out), nc._original_outputs(held_out))
    if options.get("rank") == 1.0:
        assert gap < 1e-5
    else:
        assert nc.flops_["after"] < nc.flops_["before"] and gap < 0.5
    widths = {name: row["width_after"] for row in nc.layers_ for name in row["producers"]}
    model = nc.compressed_model_
    if name == "densenet":
        assert model.layer2.norm1.num_features == widths["conv0"] + widths["layer1.conv2"]
        assert model.transition[2].in_channels == (
            widths["conv0"] + widths["layer1.conv2"] + widths["layer2.conv2"])


@pytest.mark.parametrize("options", [{"rank": 0.5}, {"rank": 0.3}, {"tol": 0.05},
                                     {"target_flops": 0.6}, {"calibration": "sequential",
                                                             "rank": 0.5}])
def test_grouped_convolution_keeps_equal_counts_per_group(options):
    """ResNeXt: into and out of a grouped conv, each of its 4 groups keeps as many channels."""
    make_input = BLOCKS["resnext"][1]
    X = make_input(48, seed=1)
    nc = NetworkCompressor(make_block("resnext"), batch_size=16, **options).fit(X)
    rows = {row["producer"]: row for row in nc.layers_}
    block = nc.compressed_model_.layer1[0]
    for name in ("layer1.0.conv1", "layer1.0.conv2"):
        assert rows[name]["width_after"] % 4 == 0
    assert block.conv2.groups == 4
    assert block.conv2.in_channels == block.conv1.out_channels == rows["layer1.0.conv1"][
        "width_after"]
    assert block.conv2.out_channels == block.conv3.in_channels == rows["layer1.0.conv2"][
        "width_after"]
    nc.transform(make_input(4, seed=2))  # the narrower grouped conv runs


def test_grouped_selection_is_per_group_and_block_diagonal():
    model = make_block("resnext")
    X = BLOCKS["resnext"][1](32, seed=1)
    units, _ = find_units(model, X[:2])
    into = units[1]
    assert into.blocks == 4 and units[2].blocks == 4
    (fac,), _ = unit_statistics(model, [into], Batches(X, 8), method="qr")
    keep, T = fac.select(5)  # rounded down to one channel per group
    assert sorted(k // 2 for k in keep) == [0, 1, 2, 3]
    mask = np.kron(np.eye(4), np.ones((1, 2))).astype(bool)
    assert np.all(T[~mask] == 0)
    assert fac.errors[5] == fac.errors[4] >= fac.errors[8] == 0


class _Shuffle(nn.Module):
    def __init__(self, functional: bool):
        super().__init__()
        self.functional = functional
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)
        self.shuffle = nn.ChannelShuffle(2)

    def forward(self, x):
        h = torch.relu(self.conv1(x))
        if self.functional:  # ShuffleNet's channel_shuffle
            b, c, height, width = h.shape
            h = h.view(b, 2, c // 2, height, width).transpose(1, 2).contiguous()
            h = h.view(b, c, height, width)
        else:
            h = self.shuffle(h)
        return self.conv2(h).mean((2, 3))


@pytest.mark.parametrize("functional, reason", [
    (True, "splits the channels into 2 groups of 4 (a channel shuffle"),
    (False, "ChannelShuffle 'shuffle', which mixes channels"),
])
def test_channel_shuffle_is_skipped(functional, reason):
    units, skipped = find_units(_Shuffle(functional).eval(), torch.randn(2, 3, 4, 4))
    assert units == []
    assert reason in _reasons(skipped)["conv1"]


@pytest.mark.parametrize("name", ["mbconv_se", "resnext", "densenet"])
def test_joint_and_grouped_statistics_are_cached(name, tmp_path):
    make_input = BLOCKS[name][1]
    X = make_input(32, seed=1)
    first = NetworkCompressor(make_block(name), rank=0.5, memory=tmp_path).fit(X)
    second = NetworkCompressor(make_block(name), rank=0.5, memory=tmp_path).fit(X)
    assert first.n_calibration_passes_ > 0 and second.n_calibration_passes_ == 0
    assert first.layers_ == second.layers_
    held_out = make_input(4, seed=2)
    np.testing.assert_array_equal(first.transform(held_out), second.transform(held_out))


def test_gate_resolved_before_a_sum_inside_the_group():
    """``g + relu(g) * up(x)``: the sum waits until the gate has made its operand a member."""
    class GatedSum(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate, self.up, self.down = nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(6, 2)

        def forward(self, x):
            g = torch.tanh(self.gate(x))
            return self.down(g + torch.relu(g) * self.up(x))

    model = GatedSum().eval()
    units, _ = find_units(model, torch.randn(3, 4))
    assert _names(units) == [(("gate", "up"), (("down", 0),))]
    X = torch.randn(64, 4)
    nc = NetworkCompressor(model, rank=1.0).fit(X)
    np.testing.assert_allclose(nc.transform(X), model(X).detach().numpy(), atol=1e-5)


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_flops_model_of_groups_is_exact(name):
    """The budget's FLOPs model predicts the compressed model's FLOPs: products over groups,
    sums over the parts of a concatenation, grouped convolutions."""
    from skid.nn._budget import FlopsModel
    from skid.nn._flops import count_flops
    from skid.nn._surgery import concat_widths

    make_input = BLOCKS[name][1]
    model = make_block(name)
    x = make_input(2)
    units, _ = find_units(model, x)
    total, per_module = count_flops(model, x)
    flops = FlopsModel.from_units(units, per_module, total, concat_widths(model, units))
    nc = NetworkCompressor(model, target_flops=0.4).fit(make_input(32, seed=1))
    assert [row["producers"] for row in nc.layers_] == [list(u.producers) for u in units]
    kept = [row["width_after"] for row in nc.layers_]
    assert flops(kept) == pytest.approx(nc.flops_["after"], rel=1e-9)
    assert nc.flops_["after"] <= 0.4 * nc.flops_["before"] * (1 + 1e-9)
