"""Tests for skid.nn._surgery: every registry entry, exact folds, metadata, export."""

import copy
import io

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from skid.nn import _surgery
from skid.nn._graph import find_units
from skid.nn._plan import Selection, Unit
from skid.nn._surgery import (
    apply_selection,
    as_samples,
    fold_in,
    register_surgery,
    slice_channels,
    slice_out,
    surgery_for,
)

from .models import ARCHITECTURES, call_args


def _run(model, batch):
    args, kwargs = call_args(batch)
    with torch.no_grad():
        out = model(*args, **kwargs)
    return out["logits"] if isinstance(out, dict) else out


def _assert_consistent(model: nn.Module) -> None:
    """Every module's metadata matches its tensors' shapes."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            assert module.weight.shape == (module.out_features, module.in_features)
        if isinstance(module, nn.modules.conv._ConvNd):
            assert module.in_channels % module.groups == 0
            assert module.weight.shape[:2] == (module.out_channels,
                                               module.in_channels // module.groups)
        if isinstance(module, nn.modules.batchnorm._NormBase):
            for name in ("weight", "bias", "running_mean", "running_var"):
                tensor = getattr(module, name)
                assert tensor is None or tensor.shape == (module.num_features,)
        if isinstance(module, nn.PReLU):
            assert module.weight.numel() == module.num_parameters
        if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) and module.bias is not None:
            assert module.bias.shape == (module.weight.shape[0],)
        for param in module.parameters(recurse=False):
            assert isinstance(param, nn.Parameter)


def _duplicate_channel(model: nn.Module, unit: Unit, src: int = 1, dst: int = 0) -> None:
    """Make channel ``dst`` of the unit an exact copy of channel ``src`` (producer and
    passthroughs), so the consumer's input has an exactly dependent column."""
    for name in (unit.producer, *unit.passthroughs):
        module = model.get_submodule(name)
        for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            if tensor.ndim and tensor.shape[0] == unit.width:
                tensor.data[dst] = tensor.data[src]


def _drop_duplicate(unit: Unit, src: int = 1, dst: int = 0, seed: int = 0) -> Selection:
    """Keep every channel but ``dst``, in a random pivot order; T maps ``dst`` to ``src``.

    A zero constant (``fit_intercept``'s, exact here) goes through every consumer's
    ``bias_shift`` and gives the consumers without a bias one (see test_intercept.py for
    nonzero constants)."""
    rng = np.random.default_rng(seed)
    keep = rng.permutation([c for c in range(unit.width) if c != dst])
    T = np.zeros((keep.size, unit.width))
    T[np.arange(keep.size), keep] = 1.0
    T[np.flatnonzero(keep == src)[0], dst] = 1.0
    zeros = (torch.zeros(unit.width, dtype=torch.float64),) * len(unit.consumers)
    return Selection(unit, torch.as_tensor(keep), torch.as_tensor(T), 0.0, intercepts=zeros)


def _full_width(unit: Unit, seed: int = 0) -> Selection:
    """Keep all channels in a random pivot order; T is the matching permutation."""
    keep = np.random.default_rng(seed).permutation(unit.width)
    T = np.zeros((unit.width, unit.width))
    T[np.arange(unit.width), keep] = 1.0
    return Selection(unit, keep, T, 0.0)


def _close(actual, expected, tol):
    scale = expected.abs().max().item() + 1e-30
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * scale)


# ----------------------------------------------------------------------------------------
# One case per registered type, covering every verb its entry has

def _seq(*layers):
    return nn.Sequential(*layers)


_CASES = {
    nn.Linear: [
        (lambda: _seq(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 3)),
         (5, 6)),
        (lambda: _seq(nn.Conv2d(2, 5, 3), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 4, 3)),
         (3, 2, 4, 4)),
    ],
    nn.Conv1d: [(lambda: _seq(
        nn.Conv1d(2, 6, 3, padding=1), nn.ReLU(), nn.Conv1d(6, 6, 3, padding=1, groups=6),
        nn.Conv1d(6, 4, 1), nn.GELU(), nn.Conv1d(4, 2, 3)), (3, 2, 8))],
    nn.Conv2d: [(lambda: _seq(
        nn.Conv2d(2, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, groups=6),
        nn.Conv2d(6, 4, 1), nn.SiLU(), nn.Conv2d(4, 2, (3, 2))), (3, 2, 6, 6))],
    nn.Conv3d: [(lambda: _seq(
        nn.Conv3d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 4, 3, padding=1, groups=4),
        nn.Conv3d(4, 3, 1), nn.Tanh(), nn.Conv3d(3, 2, 2)), (2, 2, 4, 4, 4))],
    nn.BatchNorm1d: [(lambda: _seq(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(),
                                   nn.Linear(8, 3)), (5, 6))],
    nn.BatchNorm2d: [(lambda: _seq(nn.Conv2d(2, 6, 3), nn.BatchNorm2d(6), nn.ReLU(),
                                   nn.Conv2d(6, 2, 1)), (3, 2, 5, 5))],
    nn.BatchNorm3d: [(lambda: _seq(nn.Conv3d(2, 4, 2), nn.BatchNorm3d(4), nn.ReLU(),
                                   nn.Conv3d(4, 2, 1)), (2, 2, 3, 3, 3))],
    nn.InstanceNorm1d: [(lambda: _seq(nn.Conv1d(2, 6, 3), nn.InstanceNorm1d(6, affine=True),
                                      nn.Conv1d(6, 2, 1)), (3, 2, 7))],
    nn.InstanceNorm2d: [(lambda: _seq(
        nn.Conv2d(2, 6, 3), nn.InstanceNorm2d(6, affine=True, track_running_stats=True),
        nn.ReLU(), nn.Conv2d(6, 2, 1)), (3, 2, 5, 5))],
    nn.InstanceNorm3d: [(lambda: _seq(nn.Conv3d(2, 4, 2), nn.InstanceNorm3d(4), nn.ReLU(),
                                      nn.Conv3d(4, 2, 1)), (2, 2, 3, 3, 3))],
    nn.PReLU: [(lambda: _seq(nn.Linear(6, 8), nn.PReLU(8), nn.Linear(8, 3)), (5, 6))],
}
_ROLE_VERBS = {"producer": ("slice_out",), "passthrough": ("slice_channels",),
               "consumer": ("fold_in", "as_samples", "weight_gram", "bias_shift")}


def _randomize(model: nn.Module, dtype) -> nn.Module:
    """Non-trivial BatchNorm/InstanceNorm statistics and PReLU slopes; eval mode, dtype."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._NormBase) and module.running_var is not None:
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
        if isinstance(module, nn.modules.batchnorm._NormBase) and module.weight is not None:
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
        if isinstance(module, nn.PReLU):
            module.weight.data.uniform_(0.0, 0.5)
    return model.to(dtype).eval()


def _verbs_used(model: nn.Module, units, kind: type) -> set:
    """The verbs the units apply to modules of exactly type ``kind``."""
    used = set()
    for unit in units:
        roles = [("producer", unit.producer), ("consumer", unit.consumer)]
        roles += [("passthrough", name) for name in unit.passthroughs]
        for role, name in roles:
            if type(model.get_submodule(name)) is kind:
                used.update(_ROLE_VERBS[role])
    return used


def test_every_registry_entry_has_cases():
    """Every built-in (torch) kind; kinds users register are tested where they are made."""
    builtin = {t for t in _surgery.KINDS_BY_TYPE if t.__module__.startswith("torch.")}
    assert builtin == set(_CASES)


@pytest.mark.parametrize("kind", list(_CASES), ids=lambda t: t.__name__)
def test_cases_cover_every_verb_of_the_entry(kind):
    entry = _surgery.KINDS_BY_TYPE[kind]
    verbs = {v for v in _surgery._VERBS if callable(getattr(entry, v, None))}
    used = set()
    for build, shape in _CASES[kind]:
        model = _randomize(build(), torch.float32)
        units, _ = find_units(model, torch.randn(shape))
        used |= _verbs_used(model, units, kind)
    assert used == verbs


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("kind", list(_CASES), ids=lambda t: t.__name__)
def test_registry_entry_exact_surgery(kind, dtype, tol):
    for build, shape in _CASES[kind]:
        model = _randomize(build(), dtype)
        x = torch.randn(shape, dtype=dtype)
        units, _ = find_units(model, x)
        assert units
        model.get_submodule(units[0].producer).weight.requires_grad_(False)
        for unit in units:
            _duplicate_channel(model, unit)
        expected = _run(model, x)
        compressed = copy.deepcopy(model)
        for unit in units:
            apply_selection(compressed, _drop_duplicate(unit))
        _assert_consistent(compressed)
        _close(_run(compressed, x), expected, tol)
        for unit in units:
            producer = compressed.get_submodule(unit.producer)
            assert producer.weight.shape[0] == unit.width - 1
        assert not compressed.get_submodule(units[0].producer).weight.requires_grad
        assert all(p.dtype == dtype for p in compressed.parameters())
        assert all(b.dtype == dtype for b in compressed.buffers() if b.is_floating_point())
        if dtype == torch.float32:
            exported = torch.export.export(compressed, (x,))
            _close(exported.module()(x), expected, tol)


# ----------------------------------------------------------------------------------------
# Every architecture

def test_full_width_selection_is_exact(architecture):
    _, model, batch = architecture
    units, _ = find_units(model, *call_args(batch))
    expected = _run(model, batch)
    compressed = copy.deepcopy(model)
    for i, unit in enumerate(units):
        apply_selection(compressed, _full_width(unit, seed=i))
    _assert_consistent(compressed)
    _close(_run(compressed, batch), expected, 1e-5)


def test_dropping_a_duplicated_channel_is_exact(architecture):
    _, model, batch = architecture
    units, _ = find_units(model, *call_args(batch))
    for unit in units:
        _duplicate_channel(model, unit)
    expected = _run(model, batch)
    for i, unit in enumerate(units):
        apply_selection(model, _drop_duplicate(unit, seed=i))
    _assert_consistent(model)
    _close(_run(model, batch), expected, 1e-5)


def _exact_id(Z: np.ndarray, rtol: float = 1e-9):
    """Column ID at the numerical rank by pivoted QR: (keep in pivot order, T)."""
    _, R, perm = scipy.linalg.qr(Z, mode="economic", pivoting=True)
    diag = np.abs(np.diag(R))
    k = max(1, int(np.sum(diag > rtol * diag[0]))) if diag.size and diag[0] > 0 else 1
    T = np.zeros((k, Z.shape[1]))
    T[:, perm[:k]] = np.eye(k)
    T[:, perm[k:]] = scipy.linalg.solve_triangular(R[:k, :k], R[:k, k:])
    return perm[:k], T


def _consumer_samples(model, batch, units):
    """``as_samples`` of every unit's consumer input, as float64 NumPy (rows, channels)."""
    samples, handles = {}, []
    for unit in units:
        def hook(module, args, unit=unit):
            samples[unit] = as_samples(module, args[0], unit.positions).double().numpy()
        handles.append(model.get_submodule(unit.consumer).register_forward_pre_hook(hook))
    _run(model, batch)
    for handle in handles:
        handle.remove()
    return samples


def test_exact_id_of_the_consumer_input_reproduces_outputs(architecture):
    """as_samples gives the matrix the fold needs: an exact ID of it preserves the model."""
    _, model, batch = architecture
    model = model.double()
    if torch.is_tensor(batch):
        batch = batch.double()
    units, _ = find_units(model, *call_args(batch))
    for unit in units:
        _duplicate_channel(model, unit)  # every Z gets an exactly dependent column
    samples = _consumer_samples(model, batch, units)
    expected = _run(model, batch)
    compressed = copy.deepcopy(model)
    for unit in units:
        keep, T = _exact_id(samples[unit])
        apply_selection(compressed, Selection(unit, torch.as_tensor(keep), T, 0.0))
    _close(_run(compressed, batch), expected, 1e-8)
    for unit in units:
        assert compressed.get_submodule(unit.producer).weight.shape[0] < unit.width


# ----------------------------------------------------------------------------------------
# fold_in and as_samples on a matrix with an exactly dependent column

def _dependent(n, m, positions=None, spatial=()):
    """Input whose channel m-1 is 2·(channel 0) − (channel 1); channel axis 1."""
    shape = (n, m, *spatial) if positions is None else (n, m, positions)
    x = torch.randn(shape, dtype=torch.float64)
    x[:, m - 1] = 2 * x[:, 0] - x[:, 1]
    keep = np.arange(m - 1)
    T = np.eye(m - 1, m)
    T[0, m - 1], T[1, m - 1] = 2.0, -1.0
    return x, keep, T


@pytest.mark.parametrize("consumer, spatial, positions", [
    (nn.Linear(5, 3), (), None),
    (nn.Linear(5 * 4, 3), (), 4),
    (nn.Conv1d(5, 3, 3), (7,), None),
    (nn.Conv2d(5, 3, (2, 3), padding=1), (4, 5), None),
    (nn.Conv3d(5, 3, 2), (3, 3, 3), None),
])
def test_fold_of_dependent_column_is_exact(consumer, spatial, positions):
    consumer = consumer.double()
    x, keep, T = _dependent(6, 5, positions, spatial)
    flat = x.reshape(6, -1) if positions else x
    expected = consumer(flat)
    Z = as_samples(consumer, flat, positions or 1)
    assert Z.shape == (6 * (positions or 1) * int(np.prod(spatial)), 5)
    torch.testing.assert_close(Z[:, 4], 2 * Z[:, 0] - Z[:, 1])  # columns are channels
    fold_in(consumer, T, positions or 1)
    kept = x[:, keep].reshape(6, -1) if positions else x[:, keep]
    torch.testing.assert_close(consumer(kept), expected, rtol=1e-12, atol=1e-12)


def test_as_samples_row_layout():
    linear = nn.Linear(5 * 3, 2)
    x = torch.arange(2 * 15.0).reshape(2, 15)
    Z = as_samples(linear, x, positions=3)
    torch.testing.assert_close(Z, x.view(2, 5, 3).transpose(1, 2).reshape(6, 5))
    conv = nn.Conv2d(4, 2, 1)
    x = torch.randn(2, 4, 3, 3)
    Z = as_samples(conv, x)
    torch.testing.assert_close(Z @ conv.weight.detach()[:, :, 0, 0].T + conv.bias.detach(),
                               conv(x).detach().movedim(1, -1).reshape(-1, 2))
    assert as_samples(nn.Linear(4, 2), torch.randn(2, 6, 4)).shape == (12, 4)


# ----------------------------------------------------------------------------------------
# dtypes, devices, registry behaviour and errors

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("T_type", ["numpy64", "numpy32", "torch32"])
def test_fold_keeps_weight_dtype(dtype, T_type):
    linear = nn.Linear(4, 3).to(dtype)
    T = np.eye(3, 4)
    T = {"numpy64": T, "numpy32": T.astype(np.float32), "torch32": torch.tensor(T).float()}
    fold_in(linear, T[T_type])
    assert linear.weight.dtype == dtype and linear.in_features == 3
    slice_out(linear, [0, 2])
    assert linear.weight.dtype == linear.bias.dtype == dtype
    assert linear.weight.shape == (2, 3) and linear.out_features == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["mobilenetv2_plain", "bert"])
def test_walk_and_surgery_on_the_gpu(name):
    factory, make_input = ARCHITECTURES[name]
    model = factory().cuda()
    batch = make_input()
    batch = {k: v.cuda() for k, v in batch.items()} if isinstance(batch, dict) else batch.cuda()
    units, _ = find_units(model, *call_args(batch))
    assert units
    for unit in units:
        _duplicate_channel(model, unit)
    expected = _run(model, batch)
    for unit in units:
        apply_selection(model, _drop_duplicate(unit))  # T arrives as a CPU float64 tensor
    assert all(t.is_cuda for t in [*model.parameters(), *model.buffers()])
    _close(_run(model, batch), expected, 1e-4)


def test_lookup_walks_the_mro():
    class MyLinear(nn.Linear):
        pass

    assert surgery_for(MyLinear(3, 2)) is _surgery.KINDS_BY_TYPE[nn.Linear]


def test_register_a_new_kind():
    class Scale(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(n))

    @register_surgery(Scale)
    class _ScaleSurgery:
        def slice_channels(self, module, keep):
            module.weight = nn.Parameter(module.weight.detach()[keep])

    try:
        scale = Scale(4)
        slice_channels(scale, [1, 3])
        assert scale.weight.shape == (2,)
    finally:
        del _surgery.KINDS_BY_TYPE[Scale]


def test_register_needs_a_verb():
    with pytest.raises(TypeError, match="implements none of the verbs"):
        register_surgery(nn.Identity)(type("Nothing", (), {}))


@pytest.mark.parametrize("call, error, match", [
    (lambda: slice_channels(nn.LayerNorm(4), [0]), TypeError, "no surgery for LayerNorm"),
    (lambda: slice_out(nn.BatchNorm2d(4), [0]), TypeError, "does not support `slice_out`"),
    (lambda: slice_out(nn.Conv2d(4, 4, 1, groups=2), [0]), ValueError, "equal number"),
    (lambda: fold_in(nn.Conv2d(4, 4, 1, groups=2), torch.ones(2, 4)), ValueError,
     "block-diagonal"),
    (lambda: slice_channels(nn.Conv2d(4, 8, 1, groups=4), [0]), TypeError, "depthwise"),
    (lambda: fold_in(nn.Linear(4, 2), np.eye(2, 3)), ValueError, r"shape \(k, 4\)"),
    (lambda: fold_in(nn.Linear(10, 2), np.eye(2, 3), positions=3), ValueError,
     "not a multiple of positions=3"),
    (lambda: fold_in(nn.Conv2d(4, 2, 1), np.eye(2, 4), positions=2), ValueError,
     "positions=1"),
])
def test_surgery_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


def _vgg_unit():
    model = ARCHITECTURES["vgg"][0]()
    return model, Unit("features.8", "classifier.0", 16, ("features.9",), positions=4)


@pytest.mark.parametrize("keep, T, match", [
    ([0, 0, 1], np.eye(3, 16), "distinct channel indices"),
    ([0, 16], np.eye(2, 16), r"in \[0, 16\)"),
    ([], np.zeros((0, 16)), "non-empty"),
    ([0.5, 1.0], np.eye(2, 16), "non-empty array of channel indices"),
    ([0, 1], np.eye(3, 16), r"shape \(2, 16\)"),
])
def test_bad_selection_leaves_model_unchanged(keep, T, match):
    model, unit = _vgg_unit()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=match):
        apply_selection(model, Selection(unit, torch.as_tensor(keep), T, 0.0))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("unit, error, match", [
    (Unit("features.8", "classifier.0", 12, ("features.9",), 4), ValueError, "has 16 channels"),
    (Unit("features.8", "classifier.0", 16, ("features.9",), 2), ValueError,
     "'classifier.0' .* has 32 channels"),
    (Unit("features.8", "classifer.0", 16), ValueError, "no module 'classifer.0'"),
    (Unit("features.8", "classifier.0", 16, ("features.10",), 4), TypeError, "ReLU"),
])
def test_plan_that_does_not_fit_leaves_model_unchanged(unit, error, match):
    model, _ = _vgg_unit()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=match):
        apply_selection(model, _drop_duplicate(unit))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ----------------------------------------------------------------------------------------
# A compressed model is an ordinary model: print, save, export

def _compressed(name):
    factory, make_input = ARCHITECTURES[name]
    model, batch = factory(), make_input()
    units, _ = find_units(model, *call_args(batch))
    for unit in units:
        _duplicate_channel(model, unit)
    compressed = copy.deepcopy(model)
    for unit in units:
        apply_selection(compressed, _drop_duplicate(unit))
    return model, compressed, batch


def test_print_and_save_roundtrip():
    _, compressed, batch = _compressed("vgg")
    assert "Linear(in_features=60, out_features=23" in repr(compressed)
    assert "BatchNorm2d(15," in repr(compressed)
    buffer = io.BytesIO()
    torch.save(compressed, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(_run(loaded, batch), _run(compressed, batch))
    fresh = ARCHITECTURES["vgg"][0]()
    with pytest.raises(RuntimeError, match="size mismatch"):
        fresh.load_state_dict(compressed.state_dict())


@pytest.mark.slow  # exports
@pytest.mark.parametrize("name", ["vgg_view", "bert", "mobilenetv2_residual"])
def test_torch_export(name):
    model, compressed, batch = _compressed(name)
    args, kwargs = call_args(batch)
    exported = torch.export.export(compressed, args, kwargs)
    out = exported.module()(*args, **kwargs)
    out = out["logits"] if isinstance(out, dict) else out
    _close(out, _run(model, batch), 1e-5)


@pytest.mark.slow  # exports
@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")
def test_onnx_export(tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    _, compressed, batch = _compressed("vgg")
    path = tmp_path / "vgg.onnx"
    torch.onnx.export(compressed, (batch,), str(path), dynamo=True, verbose=False)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    shapes = {tuple(init.dims) for init in proto.graph.initializer}
    assert (23, 60) in shapes  # classifier.0: 24 → 23 outputs, 16·4 → 15·4 inputs
