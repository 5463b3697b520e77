"""save_compressed / load_compressed: weights + JSON plan, reloaded into a fresh model."""

import json
import pickle

import pytest
import torch

from skid.nn import NetworkCompressor, load_compressed, save_compressed

from .models import ARCHITECTURES, call_args

pytest.importorskip("safetensors")


def _outputs(model, batch):
    args, kwargs = call_args(batch)
    with torch.no_grad():
        out = model(*args, **kwargs)
    return out if isinstance(out, torch.Tensor) else next(iter(out.values()))


@pytest.fixture
def no_unpickling(monkeypatch):
    """Any unpickling during the test fails it: the format must hold data only."""

    def refuse(*args, **kwargs):
        raise AssertionError("something was unpickled")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_round_trip_into_a_fresh_model(name, tmp_path, no_unpickling):
    factory, make_input = ARCHITECTURES[name]
    model, batch = factory(), make_input(n=16)
    try:
        nc = NetworkCompressor(model, rank=0.5).fit(batch)
    except ValueError as exc:  # the architecture with nothing prunable
        pytest.skip(str(exc)[:60])
    save_compressed(nc, tmp_path / "small")
    fresh = factory(seed=1)  # other weights: everything must come from the files
    loaded = load_compressed(fresh, tmp_path / "small")
    assert loaded is fresh and not loaded.training
    torch.testing.assert_close(_outputs(loaded, batch), _outputs(nc.compressed_model_, batch))
    for (n1, p1), (n2, p2) in zip(
        loaded.state_dict().items(), nc.compressed_model_.state_dict().items(), strict=True
    ):
        assert n1 == n2 and p1.shape == p2.shape


def test_plan_records_widths_and_report(tmp_path):
    factory, make_input = ARCHITECTURES["mlp"]
    nc = NetworkCompressor(factory(), rank=0.5).fit(make_input(n=32))
    save_compressed(nc, tmp_path)
    plan = json.loads((tmp_path / "skid_plan.json").read_text())
    assert plan["modules"]["0"]["attributes"]["out_features"] == nc.layers_[0]["width_after"]
    assert plan["modules"]["0"]["tensors"]["weight"] == [nc.layers_[0]["width_after"], 8]
    assert [row["producer"] for row in plan["layers"]] == [r["producer"] for r in nc.layers_]


def test_a_bare_module_can_be_saved(tmp_path):
    factory, make_input = ARCHITECTURES["mlp"]
    small = NetworkCompressor(factory(), rank=0.5).fit(make_input(n=32)).compressed_model_
    save_compressed(small, tmp_path)
    batch = make_input(n=4)
    torch.testing.assert_close(_outputs(load_compressed(factory(seed=3), tmp_path), batch),
                               _outputs(small, batch))


def _tamper(path, edit):
    plan_file = path / "skid_plan.json"
    plan = json.loads(plan_file.read_text())
    edit(plan)
    plan_file.write_text(json.dumps(plan))


def _set(plan, *keys_and_value):
    *keys, last, value = keys_and_value
    node = plan
    for key in keys:
        node = node[key]
    node[last] = value


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda p: _set(p, "format", "other"), "not a 'skid-compressed' plan"),
        (lambda p: _set(p, "version", 99), "version 99"),
        (lambda p: _set(p, "modules", "x"), "mapping of module names"),
        (lambda p: _set(p, "modules", "os.system", p["modules"]["0"]), "'os.system' is not"),
        (lambda p: _set(p, "modules", "0", "class", "Conv2d"), "a Conv2d in the plan"),
        (lambda p: _set(p, "modules", "0", "attributes", "__class__", 1), "no integer attr"),
        (lambda p: _set(p, "modules", "0", "attributes", "forward", 1), "no integer attr"),
        (lambda p: _set(p, "modules", "0", "attributes", "out_features", "8"), "an integer"),
        (lambda p: _set(p, "modules", "0", "tensors", "weight", [999, 8]), "no larger than"),
        (lambda p: _set(p, "modules", "0", "tensors", "weight", [4]), "must list 2 integers"),
        (lambda p: _set(p, "modules", "0", "tensors", "evil", [1]), "no parameter or buffer"),
        (lambda p: _set(p, "modules", "0", "extra", 1), "exactly 'class'"),
    ],
)
def test_a_tampered_plan_is_rejected_before_any_change(tmp_path, edit, message, no_unpickling):
    factory, make_input = ARCHITECTURES["mlp"]
    nc = NetworkCompressor(factory(), rank=0.5).fit(make_input(n=32))
    save_compressed(nc, tmp_path)
    _tamper(tmp_path, edit)
    fresh = factory()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        load_compressed(fresh, tmp_path)
    after = fresh.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_weights_that_do_not_match_the_plan_are_rejected(tmp_path):
    factory, make_input = ARCHITECTURES["mlp"]
    nc = NetworkCompressor(factory(), rank=0.5).fit(make_input(n=32))
    save_compressed(nc, tmp_path)
    _tamper(tmp_path, lambda p: p["modules"]["0"]["tensors"].update(weight=[3, 8]))
    with pytest.raises((ValueError, RuntimeError), match="size|shape|match"):
        load_compressed(factory(), tmp_path)


def test_errors_for_bad_arguments(tmp_path):
    factory, _ = ARCHITECTURES["mlp"]
    with pytest.raises(TypeError, match="fitted NetworkCompressor or a torch.nn.Module"):
        save_compressed(object(), tmp_path)
    with pytest.raises(FileNotFoundError, match="save_compressed folder"):
        load_compressed(factory(), tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        save_compressed(factory(), tmp_path / "file")
    with pytest.raises(TypeError, match="torch.nn.Module"):
        load_compressed("model", tmp_path)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "skid_plan.json").write_text("{not json")
    (tmp_path / "d" / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_compressed(factory(), tmp_path / "d")


def test_huggingface_model_with_tied_weights(tmp_path, no_unpickling):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=50,
                                     n_positions=16)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 50, (4, 8))
    small = model  # the format does not care whether skid could prune this model
    save_compressed(small, tmp_path)
    torch.manual_seed(1)
    fresh = load_compressed(transformers.GPT2LMHeadModel(config), tmp_path)
    assert fresh.lm_head.weight.data_ptr() == fresh.transformer.wte.weight.data_ptr()
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, small(ids).logits)


def _snapshot(model):
    """Every tensor object, shape and integer attribute: an untouched model keeps them all."""
    return [(name, type(m), [(k, id(v), tuple(v.shape)) for k, v in
                             (*m._parameters.items(), *m._buffers.items()) if v is not None],
             {k: v for k, v in vars(m).items() if isinstance(v, int)})
            for name, m in model.named_modules()]


def _saved_mlp(tmp_path, rank=0.5):
    factory, make_input = ARCHITECTURES["mlp"]
    nc = NetworkCompressor(factory(), rank=rank).fit(make_input(n=32))
    return factory, save_compressed(nc, tmp_path)


def _rejected(factory, path, message):
    fresh = factory()
    before = _snapshot(fresh)
    with pytest.raises(ValueError, match=message):
        load_compressed(fresh, path)
    assert _snapshot(fresh) == before


@pytest.mark.parametrize("cut", [1, 100, 1000])
def test_truncated_weights_are_refused_before_any_change(tmp_path, cut):
    factory, path = _saved_mlp(tmp_path)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-cut])
    _rejected(factory, path, r"model\.safetensors: .*(truncated|too short)")


def test_the_weights_of_another_save_are_refused_before_any_change(tmp_path):
    factory, path = _saved_mlp(tmp_path / "a", rank=0.5)
    _, other = _saved_mlp(tmp_path / "b", rank=0.25)
    (path / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    _rejected(factory, path, r"model\.safetensors: '0\.weight' has shape .* the plan gives")


def test_a_plan_that_leaves_out_a_resized_module_is_refused_before_any_change(tmp_path):
    factory, path = _saved_mlp(tmp_path)
    _tamper(path, lambda p: p["modules"].pop("0"))
    _rejected(factory, path, "'0.weight' has shape")


def test_weights_of_another_model_are_refused(tmp_path):
    factory, path = _saved_mlp(tmp_path)
    save_compressed(torch.nn.Sequential(torch.nn.Sequential(torch.nn.Linear(8, 4))),
                    tmp_path / "other")
    (path / "model.safetensors").write_bytes((tmp_path / "other" / "model.safetensors")
                                             .read_bytes())
    _rejected(factory, path, r"model\.safetensors holds .0\.0\.bias. .*does not have")


@pytest.mark.parametrize("value, message", [(999, r"must lie in \[0, "), (-5, r"must lie in"),
                                            (3, "'out_features' of '0' is 3 but its weight")])
def test_attributes_out_of_bounds_are_refused(tmp_path, value, message):
    factory, path = _saved_mlp(tmp_path)
    _tamper(path, lambda p: _set(p, "modules", "0", "attributes", "out_features", value))
    _rejected(factory, path, message)


def test_a_failure_while_loading_puts_the_model_back(tmp_path, monkeypatch):
    import safetensors.torch

    factory, path = _saved_mlp(tmp_path)

    def failing(*args, **kwargs):
        raise OSError("disk gone")

    monkeypatch.setattr(safetensors.torch, "load_model", failing)
    fresh = factory()
    before = _snapshot(fresh)
    with pytest.raises(OSError, match="disk gone"):
        load_compressed(fresh, path)
    assert _snapshot(fresh) == before


def test_a_model_on_the_meta_device_is_refused_clearly(tmp_path):
    factory, path = _saved_mlp(tmp_path)
    with torch.device("meta"):
        fresh = factory()
    before = _snapshot(fresh)
    with pytest.raises(ValueError, match="on the meta device: build the model on a real device"):
        load_compressed(fresh, path)
    assert _snapshot(fresh) == before
