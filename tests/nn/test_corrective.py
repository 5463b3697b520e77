"""calibration="corrective": exactness, the least-squares property, widths, caching, padding."""

import copy

import numpy as np
import pytest
import torch
from sklearn.base import clone
from torch import nn

from skid import NetworkCompressor
from skid.exceptions import InvalidParameterError
from skid.nn import _unit_kinds
from skid.nn._batches import Batches
from skid.nn._calibration import corrective_statistics
from skid.nn._graph import find_units
from skid.nn._surgery import apply_selection, as_samples

from .models import ARCHITECTURES, make_bert_layer, make_mlp, make_text_input, make_vgg

MODES = ("original", "sequential", "corrective")


def relative_gap(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def deep_mlp(seed=0) -> nn.Module:
    """Three hidden layers (units 0→2, 2→4, 4→6) with redundant channels."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 24), nn.Tanh(), nn.Linear(24, 20), nn.ReLU(),
                         nn.Linear(20, 16), nn.GELU(), nn.Linear(16, 3)).eval()


@pytest.fixture
def spy(monkeypatch):
    """The selections a fit applies, in order."""
    applied = []

    def record(model, selection):
        applied.append(selection)
        return apply_selection(model, selection)

    monkeypatch.setattr(_unit_kinds, "apply_selection", record)
    return applied


def consumer_input(model, unit, X) -> np.ndarray:
    """``Z`` (rows × channels) entering ``unit.consumer`` of ``model`` on ``X``."""
    seen = []
    consumer = model.get_submodule(unit.consumer)
    handle = consumer.register_forward_pre_hook(
        lambda module, args: seen.append(as_samples(module, args[0], unit.positions)))
    with torch.no_grad():
        model(X)
    handle.remove()
    return seen[0].double().numpy()


# --------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("calibration", MODES)
@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_full_rank_reproduces_the_model_in_every_mode(name, calibration):
    factory, make_input = ARCHITECTURES[name]
    nc = NetworkCompressor(factory(), rank=1.0, calibration=calibration, batch_size=16)
    nc.fit(make_input(48, seed=1))
    held_out = make_input(16, seed=2)
    assert relative_gap(nc.transform(held_out), nc._original_outputs(held_out)) < 1e-5


@pytest.mark.parametrize("name", ["mlp", "vgg", "bert"])
def test_qr_route_at_zero_tolerance_reproduces_the_calibration_outputs(name):
    factory, make_input = ARCHITECTURES[name]
    X = make_input(48, seed=1)
    nc = NetworkCompressor(factory(), tol=0.0, calibration="corrective", batch_size=16).fit(X)
    assert nc.method_ == "qr"
    assert relative_gap(nc.transform(X), nc._original_outputs(X)) < 1e-5


def test_float64_model_and_the_callers_model_untouched():
    model = make_mlp().double()
    before = copy.deepcopy(model.state_dict())
    X = torch.randn(40, 8, dtype=torch.float64)
    nc = NetworkCompressor(model, rank=0.5, calibration="corrective").fit(X)
    assert next(nc.compressed_model_.parameters()).dtype == torch.float64
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
    assert not any(m.training for m in nc.compressed_model_.modules())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models(dtype):
    model, X = make_vgg().to(dtype), torch.randn(32, 3, 16, 16)
    exact = NetworkCompressor(model, rank=1.0, calibration="corrective", batch_size=16).fit(X)
    assert relative_gap(exact.transform(X), exact._original_outputs(X)) == 0.0
    half = NetworkCompressor(model, rank=0.5, calibration="corrective", batch_size=16).fit(X)
    assert next(half.compressed_model_.parameters()).dtype == dtype
    assert np.isfinite(half.transform(X)).all()


# ----------------------------------------------------------------- least-squares property


@pytest.mark.parametrize("rank", [0.25, 0.5, 0.8])
def test_consumer_input_error_never_above_sequential(spy, rank):
    # Same upstream (the first unit is the plain ID in both modes) and the same channels of
    # the second unit (J from the compressed Gram): corrective's T is the least-squares fit
    # to the original's input, so its error against the original cannot be larger.
    model, X = deep_mlp(), torch.randn(300, 6)
    errors = {}
    for mode in ("sequential", "corrective"):
        spy.clear()
        NetworkCompressor(model, rank=rank, calibration=mode).fit(X)
        first, second = spy[0], spy[1]
        upstream = apply_selection(copy.deepcopy(model), first)
        Zc = consumer_input(upstream, second.unit, X)
        Zo = consumer_input(model, second.unit, X)
        fitted = Zc[:, second.keep.numpy()] @ second.interpolation.numpy()
        errors[mode] = np.linalg.norm(Zo - fitted) / np.linalg.norm(Zo)
    assert errors["corrective"] <= errors["sequential"] * (1 + 1e-9)
    assert errors["corrective"] < errors["sequential"]  # upstream pruned: a real gain


def test_every_step_is_least_squares_and_reports_its_error(spy):
    model, X = deep_mlp(seed=1), torch.randn(300, 6)
    nc = NetworkCompressor(model, rank=0.4, calibration="corrective").fit(X)
    work = copy.deepcopy(model)
    for selection, row in zip(spy, nc.layers_, strict=True):
        Zc = consumer_input(work, selection.unit, X)
        Zo = consumer_input(model, selection.unit, X)
        keep = selection.keep.numpy()
        fitted = Zc[:, keep] @ selection.interpolation.numpy()
        error = np.linalg.norm(Zo - fitted) / np.linalg.norm(Zo)
        assert row["error"] == pytest.approx(error, rel=1e-4)
        best = np.linalg.lstsq(Zc[:, keep], Zo, rcond=None)[0]
        assert error <= np.linalg.norm(Zo - Zc[:, keep] @ best) / np.linalg.norm(Zo) + 1e-6
        apply_selection(work, selection)


# ----------------------------------------------------------------------------- widths


def test_tol_is_met_against_the_original_activations():
    model, X = deep_mlp(), torch.randn(300, 6)
    nc = NetworkCompressor(model, tol=0.05, calibration="corrective").fit(X)
    for row in nc.layers_:
        assert row["error"] <= 0.05 or row["width_after"] == row["width_before"]
    assert any(row["width_after"] < row["width_before"] for row in nc.layers_)


def test_rank_and_flops_targets_give_the_sequential_widths():
    model, X = make_vgg(), torch.randn(48, 3, 16, 16)
    for params in ({"rank": 0.5}, {"target_flops": 0.4}):
        widths = {
            mode: [r["width_after"] for r in NetworkCompressor(
                model, calibration=mode, batch_size=16, **params).fit(X).layers_]
            for mode in ("sequential", "corrective")
        }  # fmt: skip
        assert widths["sequential"] == widths["corrective"]
    nc = NetworkCompressor(model, target_flops=0.4, calibration="corrective").fit(X)
    assert 0.35 <= nc.flops_["after"] / nc.flops_["before"] <= 0.4


# ------------------------------------------------------------------- passes and memory=


def test_two_truncated_passes_per_unit_one_for_the_first():
    model, X = deep_mlp(), torch.randn(30, 6)
    nc = NetworkCompressor(model, rank=0.5, calibration="corrective", batch_size=10).fit(X)
    assert nc.n_calibration_passes_ == 3 * (1 + 2 + 2)  # 3 batches; 3 units
    assert nc.n_calibration_samples_ == 30
    flops = NetworkCompressor(model, target_flops=0.5, calibration="corrective", batch_size=10)
    # + the one-pass error curves, and their statistics without the last batch (which judges
    # the target_flops candidates)
    assert flops.fit(X).n_calibration_passes_ == 3 + 2 + 3 * 5


def test_memory_caches_every_step(tmp_path):
    model, X = deep_mlp(), torch.randn(30, 6)
    params = dict(calibration="corrective", memory=tmp_path, batch_size=10)
    first = NetworkCompressor(model, tol=0.2, **params).fit(X)
    again = clone(first).fit(X)
    assert first.n_calibration_passes_ == 15 and again.n_calibration_passes_ == 0
    assert again.layers_ == first.layers_
    uncached = NetworkCompressor(model, tol=0.2, calibration="corrective", batch_size=10).fit(X)
    assert uncached.layers_ == first.layers_
    # another tol: the first unit's statistics are shared, the later steps are not
    assert clone(first).set_params(tol=0.02).fit(X).n_calibration_passes_ == 12
    flops = NetworkCompressor(model, target_flops=0.5, **params)
    # first step cached as well; + the curves without the last batch (2 batches)
    assert flops.fit(X).n_calibration_passes_ == 3 + 2 + 12
    assert clone(flops).fit(X).n_calibration_passes_ == 0


# ------------------------------------------------------------------- padding and errors


def test_padding_rows_are_left_out():
    model, batch = make_bert_layer(), make_text_input(8, seed=3)
    args, kwargs = (), batch
    units, _ = find_units(model, args, kwargs)
    unit = units[0]  # a feed-forward unit: (batch, sequence, channels) input
    stats, n = corrective_statistics(copy.deepcopy(model), copy.deepcopy(model), unit,
                                     Batches(batch, 4))
    assert n == 8 and stats.n_samples == int(batch["attention_mask"].sum())
    single, _ = corrective_statistics(model, None, unit, Batches(batch, 4))
    np.testing.assert_allclose(stats.cross, single.cross)
    np.testing.assert_allclose(stats.sq_norm, single.sq_norm)


def test_bad_calibration_names_the_options():
    with pytest.raises(InvalidParameterError, match="calibration.*'corrective'"):
        NetworkCompressor(make_mlp(), calibration="corective").fit(torch.randn(10, 8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_corrective_on_cuda_matches_the_cpu():
    X = torch.randn(64, 3, 16, 16)
    cpu = NetworkCompressor(make_vgg(), rank=0.5, calibration="corrective").fit(X)
    gpu = NetworkCompressor(make_vgg(), rank=0.5, calibration="corrective", device="cuda").fit(X)
    assert [r["width_after"] for r in gpu.layers_] == [r["width_after"] for r in cpu.layers_]
    assert all(not p.is_cuda for p in gpu.compressed_model_.parameters())
    assert relative_gap(gpu.transform(X), cpu.transform(X)) < 1e-3


def test_command_line_and_verbose(tmp_path, capsys):
    from skid import cli

    torch.save(deep_mlp(), tmp_path / "model.pt")
    np.save(tmp_path / "calib.npy", np.random.default_rng(0).standard_normal((40, 6)))
    code = cli.main(["compress", str(tmp_path / "model.pt"), "--data", str(tmp_path / "calib.npy"),
                     "--tol", "0.1", "--calibration", "corrective",
                     "--out", str(tmp_path / "small.pt"), "--report", str(tmp_path / "r.json")])
    assert code == 0
    assert '"calibration": "corrective"' in (tmp_path / "r.json").read_text()
    NetworkCompressor(deep_mlp(), calibration="corrective", verbose=True).fit(torch.randn(20, 6))
    assert "calibration" in capsys.readouterr().err  # one progress bar per step


@pytest.mark.parametrize("name", ["resnext", "mbconv_se", "densenet", "inception", "fire",
                                  "gated_mlp"])
def test_channel_groups_under_corrective_calibration(name):
    """Every kind of group gets a corrective fit: exact at full width, narrower at half."""
    from .blocks import BLOCKS, make_block

    model, batch = make_block(name), BLOCKS[name][1](n=16)
    full = NetworkCompressor(model, rank=1.0, tol=0, calibration="corrective").fit(batch)
    with torch.no_grad():
        torch.testing.assert_close(full.compressed_model_(batch), model(batch),
                                   atol=1e-5, rtol=1e-5)
        half = NetworkCompressor(model, rank=0.5, calibration="corrective").fit(batch)
        assert half.compressed_model_(batch).shape == model(batch).shape
    assert all(row["width_after"] < row["width_before"] for row in half.layers_)
    assert all(0 <= row["error"] <= 1 for row in half.layers_)


@pytest.mark.parametrize("method", ["gram", "qr"])
@pytest.mark.parametrize("blocks", [1, 2])
def test_fit_kept_is_the_least_squares_fit_per_block(method, blocks):
    """T for channels chosen elsewhere: the least-squares fit of Z_o from Z_c[:, keep],
    block by block (block-diagonal) for a grouped convolution."""
    from skid._corrective import CrossAccumulator, fit_kept

    rng = np.random.default_rng(0)
    Zc = rng.standard_normal((200, 8))
    Zo = Zc + 0.3 * rng.standard_normal((200, 8))
    stats = CrossAccumulator(method).update(Zc, Zo).statistics()
    keep = np.array([5, 0, 6, 3])  # two per block of 4
    T, error = fit_kept(stats, keep, blocks)
    expected = np.zeros((4, 8))
    for b in range(blocks):
        cols = np.arange(b * 8 // blocks, (b + 1) * 8 // blocks)
        rows = np.flatnonzero(np.isin(keep, cols))
        expected[np.ix_(rows, cols)] = np.linalg.lstsq(Zc[:, keep[rows]], Zo[:, cols],
                                                       rcond=None)[0]
    np.testing.assert_allclose(T, expected, atol=1e-8)
    measured = np.linalg.norm(Zo - Zc[:, keep] @ T) / np.linalg.norm(Zo)
    assert error == pytest.approx(measured, abs=1e-9)
