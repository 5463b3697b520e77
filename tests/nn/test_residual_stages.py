"""prune="residual": a CNN stage's residual stream as one unit (the joint ID of its readings)."""

import copy
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from skid.exceptions import NotPrunableError
from skid.nn import NetworkCompressor
from skid.nn._graph import find_units

from .models import BasicBlock, _finish
from .residual_models import STAGES, make_stages

_PRUNABLE = ("resnet50_stages", "mobilenetv2_stages", "depthwise_stage")
_CALIBRATIONS = ("original", "sequential", "corrective")


def _streams(units):
    return [(u.producers, tuple((c.name, c.reads) for c in u.consumers), u.passthroughs)
            for u in units if u.kind == "residual_stage"]


def _data(name, n=96, seed=0):
    return STAGES[name][1](n, seed=seed)


def _gap(model, other, x) -> float:
    with torch.no_grad():
        return float((model(x) - other(x)).abs().max() / model(x).abs().max())


def test_bottleneck_stages_are_one_stream_each():
    """Writers: the projection shortcut and every block's last conv; readers: every block's
    first conv, the next stage's projection and first conv, and the pooled classifier."""
    model = make_stages("resnet50_stages")
    units, _ = find_units(model, _data("resnet50_stages", 2), residual=True)
    assert _streams(units) == [
        (("layer1.0.downsample.0", "layer1.0.conv3", "layer1.1.conv3"),
         (("layer1.1.conv1", 0), ("layer2.0.downsample.0", 1), ("layer2.0.conv1", 1)),
         ("layer1.0.downsample.1", "layer1.0.bn3", "layer1.1.bn3")),
        (("layer2.0.downsample.0", "layer2.0.conv3", "layer2.1.conv3", "layer2.2.conv3"),
         (("layer2.1.conv1", 0), ("layer2.2.conv1", 1), ("fc", 2)),
         ("layer2.0.downsample.1", "layer2.0.bn3", "layer2.1.bn3", "layer2.2.bn3")),
    ]
    # the blocks' interiors are the channel groups they were, the stem reads into a projection
    assert [u.producers for u in units if u.kind == "channels"][:3] == [
        ("conv1",), ("layer1.0.conv1",), ("layer1.0.conv2",)]


def test_inverted_residual_stages_are_one_stream_each():
    model = make_stages("mobilenetv2_stages")
    units, _ = find_units(model, _data("mobilenetv2_stages", 2), residual=True)
    assert _streams(units) == [
        (("blocks.0.project", "blocks.1.project", "blocks.2.project"),
         (("blocks.1.expand", 0), ("blocks.2.expand", 1), ("blocks.3.expand", 2)),
         ("blocks.0.bn3", "blocks.1.bn3", "blocks.2.bn3")),
        (("blocks.3.project", "blocks.4.project"),
         (("blocks.4.expand", 0), ("head.0", 1)),
         ("blocks.3.bn3", "blocks.4.bn3")),
    ]


def test_without_residual_the_walk_is_unchanged():
    """``residual=False`` (prune without "residual") blocks at the adds, as before."""
    model = make_stages("resnet50_stages")
    x = _data("resnet50_stages", 2)
    plain, skipped = find_units(model, x)
    assert all(u.kind == "channels" for u in plain)
    assert "residual" in {s.producer: s.reason for s in skipped}["layer1.0.conv3"]
    with_streams, _ = find_units(model, x, residual=True)
    assert [u for u in with_streams if u.kind == "channels"] == plain


def test_stream_entered_mid_way_or_nested_adds_find_every_writer():
    """``a + (b + c)``: the walk from ``a`` traces the other operand back through the inner
    add to both of its writers."""
    class Nested(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = (nn.Conv2d(3, 6, 1) for _ in range(3))
            self.read = nn.Conv2d(6, 2, 1)

        def forward(self, x):
            return self.read(torch.relu(self.a(x) + (self.b(x) + self.c(x))))

    units, _ = find_units(Nested().eval(), torch.randn(2, 3, 4, 4), residual=True)
    assert [(u.kind, u.producers) for u in units] == [("residual_stage", ("a", "b", "c"))]


@pytest.mark.parametrize("calibration", _CALIBRATIONS)
@pytest.mark.parametrize("prune", ["residual", ("channels", "heads", "residual")])
@pytest.mark.parametrize("name", _PRUNABLE)
def test_full_width_reproduces_the_model(name, prune, calibration):
    model = make_stages(name)
    x = _data(name)
    nc = NetworkCompressor(model, rank=1.0, prune=prune, calibration=calibration).fit(x)
    assert any(row["kind"] == "residual" for row in nc.layers_)
    assert _gap(model, nc.compressed_model_, _data(name, 8, seed=1)) < 1e-5


@pytest.mark.parametrize("calibration", _CALIBRATIONS)
@pytest.mark.parametrize("name", _PRUNABLE)
def test_half_width_narrows_every_writer_and_reader(name, calibration):
    model = make_stages(name)
    before = copy.deepcopy(model.state_dict())
    nc = NetworkCompressor(model, rank=0.5, prune="residual", calibration=calibration)
    nc.fit(_data(name))
    small = nc.compressed_model_
    for row in nc.layers_:
        assert row["kind"] == "residual"
        k = math.ceil(row["width_before"] / 2)
        assert row["width_after"] == k and 0 <= row["error"] < 1
        for writer in row["producers"]:
            assert small.get_submodule(writer).out_channels == k
        for reader in row["consumers"]:
            module = small.get_submodule(reader)
            assert (module.in_features if isinstance(module, nn.Linear)
                    else module.in_channels) == k
        for name_ in row["passthroughs"]:
            module = small.get_submodule(name_)
            assert (module.num_features if isinstance(module, nn.BatchNorm2d)
                    else module.out_channels) == k
    assert nc.flops_["after"] < nc.flops_["before"]
    with torch.no_grad():
        assert small(_data(name, 4)).shape == (4, 5)
    for key, value in model.state_dict().items():  # the caller's model is untouched
        assert torch.equal(value, before[key])


def test_layers_row_names_writers_readers_and_passthroughs():
    nc = NetworkCompressor(make_stages("mobilenetv2_stages"), rank=0.5, prune="residual")
    row = nc.fit(_data("mobilenetv2_stages")).layers_[1]
    assert row["kind"] == "residual"
    assert row["producers"] == ["blocks.3.project", "blocks.4.project"]
    assert row["consumers"] == ["blocks.4.expand", "head.0"]
    assert row["passthroughs"] == ["blocks.3.bn3", "blocks.4.bn3"]
    assert (row["producer"], row["consumer"]) == ("blocks.3.project", "blocks.4.expand")


def test_prune_picks_the_axes():
    model, x = make_stages("resnet50_stages"), _data("resnet50_stages")
    kinds = {}
    for prune in ("channels", "residual", ("channels", "residual")):
        nc = NetworkCompressor(model, rank=0.5, prune=prune).fit(x)
        kinds[prune] = sorted({row["kind"] for row in nc.layers_})
    assert kinds == {"channels": ["channels"], "residual": ["residual"],
                     ("channels", "residual"): ["channels", "residual"]}


@pytest.mark.parametrize("prune", ["residual", ("channels", "residual")])
def test_a_cnn_stage_found_drops_the_transformer_stream_skip(prune):
    """The transformer finder's "not a known transformer layout" record is noise once a CNN
    stage was found; where none was, it stays (the user asked for a stream and got none)."""
    def reasons(name):  # every skip reason, from skipped_ or the error listing them
        nc = NetworkCompressor(make_stages(name), rank=0.5, prune=prune)
        try:
            return " ".join(s["reason"] for s in nc.fit(_data(name)).skipped_)
        except NotPrunableError as error:
            return str(error)

    assert "not a known transformer layout" not in reasons("resnet50_stages")
    assert "not a known transformer layout" in reasons("convnext_stage")


def test_every_reader_gets_its_own_interpolation():
    """The readings differ (one per block), so the readers' ``T`` differ."""
    nc = NetworkCompressor(make_stages("resnet50_stages"), rank=0.5, prune="residual")
    nc.fit(_data("resnet50_stages"))
    selection = nc.plan_.selections[1]
    assert selection.unit.n_readings == 3
    folds = selection.interpolations
    assert len(folds) == 3 and not torch.allclose(folds[0], folds[2])
    keep = selection.keep.numpy()  # pivot order, as the rows of T
    for T in folds:  # each is the identity on the kept channels
        np.testing.assert_allclose(T.numpy()[:, keep], np.eye(keep.size), atol=1e-12)


def test_tol_applies_to_the_stream():
    model, x = make_stages("resnet50_stages"), _data("resnet50_stages", 128)
    widths = [
        [row["width_after"] for row in NetworkCompressor(model, tol=tol, prune="residual")
         .fit(x).layers_]
        for tol in (0.3, 0.05, 0.0)]
    assert widths[0] <= widths[1] <= widths[2]
    assert widths[0] != widths[2]
    assert widths[2] == [16, 24]  # tol=0 keeps every channel


def test_target_flops_counts_the_stream_in_every_writer_and_reader():
    from skid.nn._budget import FlopsModel
    from skid.nn._flops import count_flops

    model, x = make_stages("resnet50_stages"), _data("resnet50_stages")
    prune = ("channels", "residual")
    nc = NetworkCompressor(model, target_flops=0.4, prune=prune).fit(x)
    assert nc.flops_["after"] <= 0.4 * nc.flops_["before"] * (1 + 1e-9)
    units, _ = find_units(model, x[:2], residual=True)
    total, per_module = count_flops(model, x[:2])
    flops = FlopsModel.from_units(units, per_module, total)
    assert [row["producers"] for row in nc.layers_] == [list(u.producers) for u in units]
    assert flops([row["width_after"] for row in nc.layers_]) == pytest.approx(
        nc.flops_["after"], rel=1e-9)


@pytest.mark.parametrize("name", ["resnet50_stages", "mobilenetv2_stages"])
def test_save_and_load_compressed_round_trip(name, tmp_path):
    pytest.importorskip("safetensors")
    from skid.nn import load_compressed, save_compressed

    nc = NetworkCompressor(make_stages(name), rank=0.5, prune=("channels", "residual"))
    nc.fit(_data(name))
    save_compressed(nc, tmp_path / "small")
    plan = json.loads((tmp_path / "small" / "skid_plan.json").read_text())
    row = next(r for r in plan["layers"] if r["kind"] == "residual")
    for writer in row["producers"]:
        assert plan["modules"][writer]["attributes"]["out_channels"] == row["width_after"]
    loaded = load_compressed(make_stages(name, seed=1), tmp_path / "small")
    x = _data(name, 4, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), nc.compressed_model_(x))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet50_stages", "mobilenetv2_stages"])
def test_compressed_stages_export(name):
    nc = NetworkCompressor(make_stages(name), rank=0.5, prune=("channels", "residual"))
    nc.fit(_data(name))
    x = _data(name, 2, seed=3)
    exported = torch.export.export(nc.compressed_model_, (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), nc.compressed_model_(x))


def test_depthwise_readers_are_sliced_with_the_stream():
    """A depthwise conv reading the stream acts per channel: it keeps ``J`` (no ``T``) and
    the dense layer after it reads its kept outputs through its own ``T``."""
    nc = NetworkCompressor(make_stages("depthwise_stage"), rank=0.5, prune="residual")
    nc.fit(_data("depthwise_stage"))
    (row,) = nc.layers_
    assert {"blocks.0.dw", "blocks.1.dw"} <= set(row["passthroughs"])
    assert nc.compressed_model_.blocks[0].dw.groups == row["width_after"] == 4


@pytest.mark.parametrize("name, producer, reason", [
    ("convnext_stage", "stem.0", "LayerNorm 'blocks.0.norm', which mixes channels"),
    ("stream_out", "block.conv3", "reach the model output"),
    ("stream_out", "stem.0", "reach the model output"),
])
def test_streams_that_cannot_be_pruned_say_why(name, producer, reason):
    model = make_stages(name)
    nc = NetworkCompressor(model, rank=0.5, prune=("channels", "residual"))
    nc.fit(_data(name))
    assert reason in {s["producer"]: s["reason"] for s in nc.skipped_}[producer]
    assert all(row["kind"] == "channels" for row in nc.layers_)
    with pytest.raises(NotPrunableError, match=reason.split("'")[0]):
        NetworkCompressor(model, rank=0.5, prune="residual").fit(_data(name))


def test_a_parameter_added_to_the_stream_blocks_it():
    class Positional(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.read = nn.Conv2d(3, 6, 1), nn.Conv2d(6, 2, 1)
            self.pos = nn.Parameter(torch.randn(1, 6, 4, 4))

        def forward(self, x):
            return self.read(self.stem(x) + self.pos).mean((2, 3))

    _, skipped = find_units(Positional().eval(), torch.randn(2, 3, 4, 4), residual=True)
    assert "not made by a Linear/Conv layer" in {s.producer: s.reason for s in skipped}["stem"]


def test_the_stream_error_sums_its_readings():
    """Every reading of a stream feeds another block: its error curve (what ``tol`` and the
    budget see, and the reported error) is the root of the *sum* of the readings' squared
    relative errors, ``sqrt(n_readings)`` times their root mean square."""
    from skid.nn._batches import Batches
    from skid.nn._calibration import unit_statistics
    from skid.nn._joint import JointFactorization

    model, x = make_stages("resnet50_stages"), _data("resnet50_stages")
    units, _ = find_units(model, x[:2], residual=True)
    stream = [u for u in units if u.kind == "residual_stage"][1]
    (fac,), _ = unit_statistics(model, [stream], Batches(x, 32))
    assert isinstance(fac, JointFactorization) and stream.n_readings == 3
    mean = JointFactorization(fac.factors, 1e-8)
    np.testing.assert_allclose(fac.errors, np.sqrt(3) * mean.errors, rtol=1e-12)
    nc = NetworkCompressor(model, rank=0.5, prune="residual", method="qr").fit(x)
    assert nc.layers_[1]["error"] == pytest.approx(fac.errors[12], rel=1e-6)


class _GroupedReader(nn.Module):
    """A stream of two writers read by a grouped 1×1 conv (ResNeXt-style) and a classifier."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 1)
        self.grouped, self.fc = nn.Conv2d(8, 6, 1, groups=2), nn.Linear(8, 4)

    def forward(self, x):
        s = torch.relu(self.a(x) + self.b(x))
        return self.fc(s.mean((2, 3))) + self.grouped(s).mean((1, 2, 3))[:, None]


def test_a_grouped_reader_keeps_equal_counts_per_group():
    model, x = _GroupedReader().eval(), torch.randn(64, 3, 6, 6)
    full = NetworkCompressor(model, rank=1.0, prune="residual").fit(x)
    assert _gap(model, full.compressed_model_, x[:8]) < 1e-5
    nc = NetworkCompressor(model, rank=0.5, prune="residual").fit(x)
    (selection,) = nc.plan_.selections
    assert selection.unit.blocks == 2
    assert sorted((selection.keep.numpy() // 4).tolist()) == [0, 0, 1, 1]


def test_exclude_and_layers_act_on_the_whole_stream():
    model, x = make_stages("resnet50_stages"), _data("resnet50_stages")
    nc = NetworkCompressor(model, rank=0.5, prune="residual", exclude=["layer2.1"]).fit(x)
    assert [row["producer"] for row in nc.layers_] == ["layer1.0.downsample.0"]
    reason = {s["producer"]: s["reason"] for s in nc.skipped_}["layer2.2.conv3"]
    assert "'layer2.1.conv3' is inside 'layer2.1'" in reason
    nc = NetworkCompressor(model, rank=0.5, prune="residual", layers=["layer2.2.conv3"]).fit(x)
    assert [row["producer"] for row in nc.layers_] == ["layer2.0.downsample.0"]


def test_a_stream_across_blocks_turns_block_wise_calibration_off():
    """A stage's stream runs through every block of its list: no block holds it, so
    ``blocks="auto"`` calibrates in one pass and naming the list says why it cannot."""
    class Listed(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.blocks = nn.ModuleList(BasicBlock(8, 8) for _ in range(3))
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            x = self.stem(x)
            for block in self.blocks:
                x = block(x)
            return self.fc(x.mean((2, 3)))

    torch.manual_seed(0)
    model, x = _finish(Listed(), 0), torch.randn(64, 3, 6, 6)
    assert NetworkCompressor(model, rank=0.5, prune="channels").fit(x).blocks_ == "blocks"
    nc = NetworkCompressor(model, rank=1.0, prune=("channels", "residual")).fit(x)
    assert nc.blocks_ is None and _gap(model, nc.compressed_model_, x[:8]) < 1e-5
    with pytest.raises(ValueError, match="blocks='blocks' cannot be calibrated block by block"):
        NetworkCompressor(model, rank=0.5, prune="residual", blocks="blocks").fit(x)


@pytest.mark.parametrize("name, writers", [
    ("resnet50_stem", ("layer1.0.downsample.0", "layer1.0.conv3")),
    ("resnext", ("layer1.0.downsample.0", "layer1.0.conv3")),
    ("mbconv_se", ("stem.0", "project.0")),
])
def test_the_blocks_streams_are_exact_at_full_width(name, writers):
    from .blocks import BLOCKS, make_block

    model, x = make_block(name), BLOCKS[name][1](64)
    nc = NetworkCompressor(model, rank=1.0, prune=("channels", "residual")).fit(x)
    assert [tuple(r["producers"]) for r in nc.layers_ if r["kind"] == "residual"] == [writers]
    assert _gap(model, nc.compressed_model_, BLOCKS[name][1](8, seed=1)) < 1e-5


def test_an_in_place_add_into_the_stream():
    """``x += block(x)``: the in-place add makes a new value of the stream's tensor."""
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.a1, self.a2 = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 3, padding=1)
            self.fc = nn.Linear(8, 3)

        def forward(self, x):
            x = self.stem(x)
            x += self.a2(torch.relu(self.a1(x)))
            return self.fc(torch.relu(x).mean((2, 3)))

    model, x = InPlace().eval(), torch.randn(64, 3, 6, 6)
    nc = NetworkCompressor(model, rank=1.0, prune="residual").fit(x)
    assert nc.layers_[0]["producers"] == ["stem", "a2"]
    assert nc.layers_[0]["consumers"] == ["a1", "fc"]
    assert _gap(model, nc.compressed_model_, x[:8]) < 1e-5
    half = NetworkCompressor(model, rank=0.5, prune="residual").fit(x).compressed_model_
    assert half.stem.out_channels == half.a2.out_channels == half.fc.in_features == 4


def test_stream_statistics_are_cached_apart_from_the_channel_groups(tmp_path):
    """``memory=``: a refit reads the streams' statistics back; a fit without "residual" does
    not take them for its own units."""
    model, x = make_stages("resnet50_stages"), _data("resnet50_stages", 48)
    prune = ("channels", "residual")
    first = NetworkCompressor(model, rank=0.5, prune=prune, memory=tmp_path).fit(x)
    second = NetworkCompressor(model, tol=0.1, prune=prune, memory=tmp_path).fit(x)
    assert first.n_calibration_passes_ > 0 and second.n_calibration_passes_ == 0
    plain = NetworkCompressor(model, rank=0.5, prune="channels", memory=tmp_path).fit(x)
    assert plain.n_calibration_passes_ > 0
    assert {r["kind"] for r in plain.layers_} == {"channels"}


def test_pre_activation_readers_slice_their_batchnorm():
    """Pre-activation blocks read the stream through ``relu(bn(x))``: the BatchNorm acts per
    channel on the stream and keeps ``J`` with it; the conv after it takes ``T``."""
    class PreAct(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.bn = nn.ModuleList(nn.BatchNorm2d(8) for _ in range(2))
            self.conv = nn.ModuleList(nn.Conv2d(8, 8, 3, padding=1) for _ in range(2))
            self.fc = nn.Linear(8, 3)

        def forward(self, x):
            x = self.stem(x)
            for bn, conv in zip(self.bn, self.conv, strict=True):
                x = x + conv(torch.relu(bn(x)))
            return self.fc(x.mean((2, 3)))

    model, x = _finish(PreAct(), 0), torch.randn(64, 3, 6, 6)
    nc = NetworkCompressor(model, rank=1.0, prune="residual", blocks=None).fit(x)
    (row,) = nc.layers_
    assert row["passthroughs"] == ["bn.0", "bn.1"] and row["consumers"] == [
        "conv.0", "conv.1", "fc"]
    assert _gap(model, nc.compressed_model_, x[:8]) < 1e-5
