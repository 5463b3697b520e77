"""Tapes (block outputs on disk): plain tensors plus a structure, verified before use."""

import json
from collections import OrderedDict
from typing import NamedTuple

import joblib
import pytest
import torch

from skid.nn import _tapes
from skid.nn._calibration import calibration_passes

from .test_blocks import X, assert_same_models, fit, fit_interrupted, make_stack


class Pair(NamedTuple):
    hidden: torch.Tensor
    extra: object


def nested():
    h = torch.randn(3, 4)
    return (h, Pair(h, None), [torch.arange(5), {"a": torch.ones(2, dtype=torch.bfloat16)}],
            OrderedDict(b=torch.tensor([True, False]), c=torch.empty(0, 3)), 7, "x")


def assert_same(a, b):
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    else:
        assert a == b


def store(tmp_path):
    return _tapes.TapeStore(joblib.Memory(str(tmp_path), verbose=0))  # as memory= makes it


def test_any_nesting_round_trips_without_pickling(tmp_path):
    value = nested()
    recorder = _tapes.Recorder(store(tmp_path).folder("k"))
    recorder.append(value)
    (entry,) = recorder.finish(1)
    raw = open(entry.path, "rb").read()
    assert b"\x80\x04" not in raw[:2] and json.loads(raw[8 : 8 + int.from_bytes(raw[:8],
                                                                              "little")])
    types = _tapes.flatten(value)[2]
    (loaded,) = store(tmp_path).load("k", 1, types)
    back = loaded.read(torch.device("cpu"))
    assert_same(back, value)
    assert back[1].hidden is back[0]  # one tensor twice is stored once, read back once


def test_a_class_the_live_model_does_not_produce_makes_the_tape_foreign(tmp_path):
    recorder = _tapes.Recorder(store(tmp_path).folder("k"))
    recorder.append(Pair(torch.ones(2), None))
    recorder.finish(1)
    assert store(tmp_path).load("k", 1, {}) is None  # no class of that name: not read
    assert store(tmp_path).load("k", 1, _tapes.flatten(Pair(1, 2))[2]) is not None


def test_outputs_a_tape_cannot_store_are_named():
    with pytest.raises(TypeError, match="holds a object, which a tape cannot store"):
        _tapes.flatten((torch.ones(1), object()))


def record(folder, n, value=None):
    recorder = _tapes.Recorder(folder)
    for i in range(n):
        recorder.append(torch.full((2,), float(i)) if value is None else value)
    return recorder


@pytest.mark.parametrize("damage", ["delete", "truncate", "flip", "index", "version"])
def test_a_damaged_tape_is_not_loaded_and_a_new_recording_replaces_it(tmp_path, damage):
    folder = store(tmp_path).folder("k")
    record(folder, 3).finish(3)
    assert store(tmp_path).load("k", 3) is not None
    path = f"{folder}/1.tape"
    if damage == "delete":
        __import__("os").remove(path)
    elif damage == "truncate":
        open(path, "r+b").truncate(20)
    elif damage == "flip":
        raw = bytearray(open(path, "rb").read())
        raw[-1] ^= 1
        open(path, "wb").write(raw)
    elif damage == "index":
        __import__("os").remove(f"{folder}/index.json")
    else:
        index = json.load(open(f"{folder}/index.json"))
        index["version"] = 0
        json.dump(index, open(f"{folder}/index.json", "w"))
    assert store(tmp_path).load("k", 3) is None
    entries = record(folder, 3, torch.ones(2)).finish(3)
    assert entries is not None and [e.path.rsplit("/", 2)[-2] for e in entries] == ["k"] * 3
    loaded = store(tmp_path).load("k", 3)
    assert torch.equal(loaded[1].read(torch.device("cpu")), torch.ones(2))


def test_an_incomplete_recording_never_replaces_a_complete_one(tmp_path):
    folder = store(tmp_path).folder("k")
    record(folder, 2).finish(2)
    assert record(folder, 1, torch.ones(2)).finish(2) is None  # interrupted
    loaded = store(tmp_path).load("k", 2)
    assert torch.equal(loaded[1].read(torch.device("cpu")), torch.full((2,), 1.0))
    # a second complete recording keeps the first (the same content by key)
    again = record(folder, 2, torch.ones(2)).finish(2)
    assert torch.equal(again[1].read(torch.device("cpu")), torch.full((2,), 1.0))
    assert sorted(p.name for p in (tmp_path / "joblib" / "skid_block_outputs").iterdir()) == ["k"]


@pytest.mark.parametrize("damage", ["delete", "truncate"])
@pytest.mark.parametrize("calibration", ["original", "sequential"])
def test_a_resumed_fit_re_records_a_damaged_tape(tmp_path, monkeypatch, damage, calibration):
    model = make_stack()
    fresh = fit(model, X, calibration=calibration, rank=0.5)
    fit_interrupted(monkeypatch, model, calibration=calibration, rank=0.5, memory=tmp_path)
    tapes = sorted((tmp_path / "joblib" / "skid_block_outputs").glob("*/2.tape"))
    assert tapes
    for path in tapes:
        if damage == "delete":
            path.unlink()
        else:
            open(path, "r+b").truncate(30)
    before = calibration_passes()
    resumed = fit(model, X, calibration=calibration, rank=0.5, memory=tmp_path)
    assert calibration_passes() > before
    assert_same_models(resumed, fresh)
    assert all(store(tmp_path).load(p.parent.name, 4, {}) is not None for p in tapes)


class Opaque:
    """Something a block returns that a tape cannot store."""


def test_an_output_a_tape_cannot_store_stays_on_the_host(tmp_path):
    from torch import nn

    from .test_blocks import Block

    class OddBlock(Block):
        def forward(self, x):
            return super().forward(x), Opaque()

    class OddChain(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Linear(6, 12)
            self.layers = nn.ModuleList(OddBlock(12, 24) for _ in range(3))
            self.head = nn.Linear(12, 3)

        def forward(self, x):
            h = self.stem(x)
            for layer in self.layers:
                h = layer(h)[0]
            return self.head(h)

    torch.manual_seed(0)
    model = OddChain().eval()
    blockwise = fit(model, X, rank=0.5, calibration="sequential", memory=tmp_path)
    assert blockwise.blocks_ == "layers"
    assert_same_models(blockwise, fit(model, X, rank=0.5, calibration="sequential",
                                      blocks=None))
    root = tmp_path / "joblib" / "skid_block_outputs"
    assert not root.exists() or not list(root.iterdir())  # nothing half-stored
