"""Calibration: batch handling, streamed statistics, padding masks, the content-keyed cache."""

import copy

import joblib
import numpy as np
import pytest
import torch
from torch import nn

from skid.nn._batches import Batches, to_inputs
from skid.nn._calibration import (
    StatisticsCache,
    calibration_passes,
    fingerprint,
    model_fingerprint,
    unit_statistics,
)
from skid.nn._graph import find_units
from skid.nn._surgery import as_samples

from .models import call_args, make_bert_layer, make_cnn2d, make_mlp, make_text_input


def units_of(model, batch):
    args, kwargs = call_args(batch)
    return find_units(model, args, kwargs)[0]


def consumer_inputs(model, unit, batches):
    """The consumer's input on every batch, captured by a plain forward hook."""
    captured = []
    handle = dict(model.named_modules())[unit.consumer].register_forward_pre_hook(
        lambda module, args: captured.append(args[0].detach().clone())
    )
    try:
        with torch.no_grad():
            for batch in batches:
                args, kwargs = call_args(batch)
                model(*args, **kwargs)
    finally:
        handle.remove()
    return captured


# ----------------------------------------------------------------------------- batches


def test_tensor_is_cut_into_batches():
    X = torch.randn(10, 3)
    batches = list(Batches(X, 4))
    assert [len(b) for b in batches] == [4, 4, 2]
    torch.testing.assert_close(torch.cat(batches), X)


def test_dict_of_arrays_is_cut_along_the_first_axis():
    X = {"input_ids": np.arange(20).reshape(10, 2), "attention_mask": np.ones((10, 2))}
    batches = list(Batches(X, 3))
    assert len(batches) == 4
    assert batches[-1]["input_ids"].tolist() == [[18, 19]]


def test_list_of_batches_is_re_iterable():
    X = [torch.randn(3, 2), torch.randn(5, 2)]
    batches = Batches(X, 100)
    assert batches.n_batches == 2
    assert [len(b) for b in batches] == [len(b) for b in batches] == [3, 5]


def test_one_shot_iterator_yields_its_first_batch_back():
    source = [torch.full((2, 3), float(i)) for i in range(3)]
    batches = Batches(iter(source), 100)
    assert torch.equal(batches.first, source[0])
    assert [float(b[0, 0]) for b in batches] == [0.0, 1.0, 2.0]
    with pytest.raises(RuntimeError, match="already consumed"):
        list(batches)


def test_one_shot_iterator_can_be_kept_for_several_passes():
    batches = Batches((torch.full((2, 3), float(i)) for i in range(3)), 100, reusable=True)
    assert [float(b[0, 0]) for b in batches] == [float(b[0, 0]) for b in batches] == [0, 1, 2]


@pytest.mark.parametrize(
    "X, message",
    [
        (torch.empty(0, 3), "0 samples"),
        (np.empty((0, 4)), "0 samples"),
        ([], "no calibration batch"),
        (iter([]), "no calibration batch"),
        (torch.randn(5), "at least 2 dimensions"),
        ({"a": np.ones((3, 2)), "b": np.ones((4, 2))}, "different numbers of samples"),
    ],
)
def test_bad_data_is_rejected(X, message):
    with pytest.raises(ValueError, match=message):
        Batches(X, 4)


def test_non_iterable_data_is_a_type_error():
    with pytest.raises(TypeError, match="iterable of batches"):
        Batches(3.0, 4)


def test_inputs_follow_the_model_device_and_dtype():
    (x,), kwargs = to_inputs(np.ones((2, 3)), "cpu", torch.float32)
    assert x.dtype == torch.float32 and kwargs == {}
    args, kwargs = to_inputs(
        {"ids": np.array([[1, 2]]), "x": np.ones((1, 2))}, "cpu", torch.float64
    )
    assert args == () and kwargs["ids"].dtype == torch.int64
    assert kwargs["x"].dtype == torch.float64
    (x,), _ = to_inputs(
        (torch.ones(2, 3, dtype=torch.float64), torch.arange(2)), "cpu", torch.float32
    )
    assert x.dtype == torch.float32 and x.shape == (2, 3)


def test_data_fingerprint_ignores_labels_and_sees_values():
    X = torch.randn(6, 3)
    labelled = Batches([(X[:3], torch.zeros(3)), (X[3:], torch.ones(3))], 100)
    assert labelled.fingerprint() == Batches([X[:3], X[3:]], 100).fingerprint()
    changed = X.clone()
    changed[5, 2] += 1e-6
    assert Batches(X, 3).fingerprint() != Batches(changed, 3).fingerprint()
    assert Batches(X, 3).fingerprint() != Batches(X, 2).fingerprint()


# -------------------------------------------------------------------------- statistics


def test_statistics_are_the_consumer_inputs_gram():
    model = make_cnn2d()
    X = torch.randn(12, 3, 8, 8)
    units = units_of(model, X[:2])
    facs, n_samples = unit_statistics(model, units, Batches(X, 5))
    assert n_samples == 12
    for unit, fac in zip(units, facs, strict=True):
        Z = torch.cat(
            [
                as_samples(dict(model.named_modules())[unit.consumer], z, unit.positions)
                for z in consumer_inputs(model, unit, [X])
            ]
        ).double()
        assert fac.n_features == unit.width
        assert fac.sq_norm == pytest.approx(float((Z**2).sum()), rel=1e-6)
        k = max(1, unit.width // 2)
        keep, T = fac.select(k)
        residual = torch.linalg.norm(Z - Z[:, keep] @ torch.as_tensor(T)) / torch.linalg.norm(Z)
        assert float(residual) == pytest.approx(fac.errors[k], rel=1e-4, abs=1e-7)


def test_statistics_do_not_depend_on_the_batching():
    model = make_mlp()
    X = torch.randn(40, 8)
    units = units_of(model, X[:2])
    one, _ = unit_statistics(model, units, Batches(X, 40))
    many, _ = unit_statistics(model, units, Batches(X, 3))
    for a, b in zip(one, many, strict=True):
        np.testing.assert_allclose(a.errors, b.errors, rtol=1e-6, atol=1e-9)  # float32 forward
        np.testing.assert_array_equal(a.perm, b.perm)


def test_qr_statistics_match_the_gram_ones():
    model = make_mlp()
    X = torch.randn(40, 8, dtype=torch.float64)
    model = model.double()
    units = units_of(model, X[:2])
    gram, _ = unit_statistics(model, units, Batches(X, 7), method="gram")
    qr, _ = unit_statistics(model, units, Batches(X, 7), method="qr")
    for a, b in zip(gram, qr, strict=True):
        np.testing.assert_allclose(a.errors, b.errors, atol=1e-6)


def test_forward_stops_after_the_last_consumer():
    model = make_mlp()
    X = torch.randn(9, 8)
    units = units_of(model, X[:2])
    calls = []
    model[5].register_forward_hook(lambda *args: calls.append(1))
    model[2].register_forward_hook(lambda *args: calls.append(2))
    passes = calibration_passes()
    unit_statistics(model, units[:1], Batches(X, 3))
    assert calibration_passes() - passes == 3
    assert calls == []  # unit 0's consumer is model[2]: nothing at or after it ran


def test_padding_positions_are_left_out():
    model = make_bert_layer()
    batch = make_text_input(n=4, length=6)
    units = units_of(model, batch)
    ffn = [u for u in units if u.consumer.endswith("output.dense")]
    facs, n_samples = unit_statistics(model, ffn, Batches([batch], 100))
    assert n_samples == 4
    mask = batch["attention_mask"].bool()
    assert (~mask).sum() > 0
    for unit, fac in zip(ffn, facs, strict=True):
        (z,) = consumer_inputs(model, unit, [batch])
        assert fac.sq_norm == pytest.approx(float((z[mask].double() ** 2).sum()), rel=1e-6)
        assert fac.sq_norm < float((z.double() ** 2).sum())


def test_half_precision_models_are_calibrated_in_float32_or_better():
    model = make_mlp().to(torch.bfloat16)
    X = torch.randn(20, 8)
    units = units_of(model, X[:2].to(torch.bfloat16))
    facs, _ = unit_statistics(model, units, Batches(X, 8))
    for fac in facs:
        assert np.isfinite(fac.errors).all() and fac.errors[0] == 1.0


def test_model_errors_are_reworded():
    model = make_mlp()
    units = units_of(model, torch.randn(2, 8))
    message = r"could not run on the calibration batch.*shape \(4, 5\)"
    with pytest.raises(ValueError, match=message):
        unit_statistics(model, units, Batches(torch.randn(4, 5), 8))


def test_non_finite_activations_name_the_layer():
    model = make_mlp()
    X = torch.randn(6, 8)
    units = units_of(model, X[:2])
    X[3, 1] = float("nan")
    with pytest.raises(ValueError, match=r"entering '2'.*NaN or infinite"):
        unit_statistics(model, units, Batches(X, 4))


def test_hooks_are_removed_even_on_failure():
    model = make_mlp()
    units = units_of(model, torch.randn(2, 8))
    with pytest.raises(ValueError):
        unit_statistics(model, units, Batches(torch.randn(4, 5), 8))
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_progress_bar_when_verbose(capsys):
    model = make_mlp()
    X = torch.randn(6, 8)
    unit_statistics(model, units_of(model, X[:2]), Batches(X, 2), verbose=True)
    assert "calibration" in capsys.readouterr().err


# ------------------------------------------------------------------------------- cache


def test_model_fingerprint_is_content_based():
    model, x = make_mlp(), torch.randn(2, 8)
    twin = copy.deepcopy(model)
    assert model_fingerprint(model, (x,)) == model_fingerprint(twin, (x.clone(),))
    with torch.no_grad():
        twin[0].bias[0] += 1e-4
    assert model_fingerprint(model, (x,)) != model_fingerprint(twin, (x,))
    shorter = nn.Sequential(*make_mlp()[:3])
    assert model_fingerprint(make_mlp(), (x,)) != model_fingerprint(shorter, (x,))


def test_cache_skips_the_forward_passes_for_the_same_content(tmp_path):
    model = make_mlp()
    X = torch.randn(20, 8)
    units = units_of(model, X[:2])
    cache = StatisticsCache(joblib.Memory(tmp_path, verbose=0))

    def get(m, data):
        batches = Batches(data, 8)
        key = fingerprint(model_fingerprint(m, (data[:2],)), batches.fingerprint(),
                          [repr(u) for u in units])
        return cache.get(key, m, units, batches, method="gram", precision="float64", verbose=False)

    passes = calibration_passes()
    first, _ = get(model, X)
    assert calibration_passes() - passes == 3
    second, _ = get(copy.deepcopy(model), X.clone())  # another object, same content
    assert calibration_passes() - passes == 3
    np.testing.assert_array_equal(first[0].errors, second[0].errors)
    get(model, X + 1)
    assert calibration_passes() - passes == 6


def test_cache_accepts_a_path(tmp_path):
    assert isinstance(StatisticsCache(str(tmp_path)).memory, joblib.Memory)
    assert StatisticsCache(None).memory is None
