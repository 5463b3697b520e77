"""Output weights of the units for target_flops, and the held-out batch that judges."""

import numpy as np
import torch
from torch import nn

from skid.nn import NetworkCompressor
from skid.nn._batches import Batches
from skid.nn._calibration import unit_statistics
from skid.nn._graph import find_units
from skid.nn._outputs import batch_outputs, output_distance
from skid.nn._planner import apply, select
from skid.nn._sensitivity import held_out_batch, output_weights


def _two_branches(scale):
    """Two hidden units of the same activations; the second's readout is ``scale`` times
    larger, so the same relative error moves the output ``scale²`` as much (squared)."""
    torch.manual_seed(0)
    first, second = nn.Linear(6, 16), nn.Linear(6, 16)
    second.load_state_dict(first.state_dict())
    read1, read2 = nn.Linear(16, 3, bias=False), nn.Linear(16, 3, bias=False)
    read2.weight.data = read1.weight.data * scale

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.ra, self.rb = first, second, read1, read2

        def forward(self, x):
            return self.ra(torch.relu(self.a(x))) + self.rb(torch.relu(self.b(x)))

    return Model().eval()


def _fold(model, unit, fac, k):
    apply(model, select(unit, fac, k))


def test_weights_measure_the_output_change_per_squared_error():
    model, X = _two_branches(10.0), torch.randn(300, 6)
    units, _ = find_units(model, X[:2])
    facs, _ = unit_statistics(model, units, Batches(X, 300))
    weights = output_weights(model, units, facs, [4, 4], X, _fold, batch_outputs,
                             output_distance)
    assert np.all(weights > 0)
    np.testing.assert_allclose(weights[1] / weights[0], 100.0, rtol=1e-3)
    whole = output_weights(model, units, facs, [16, 4], X, _fold, batch_outputs,
                           output_distance)  # unit 0 says nothing: the median
    assert whole[0] == whole[1]


def test_held_out_batch_is_the_second_when_there_is_one():
    X = torch.arange(10.0).reshape(5, 2)
    assert torch.equal(held_out_batch(Batches(X, 2)), X[2:4])
    assert torch.equal(held_out_batch(Batches(X, 8)), X)  # one batch: the first
    assert torch.equal(held_out_batch(Batches([X[:1], X[1:3]], 2)), X[1:3])
    assert torch.equal(held_out_batch(Batches(iter([X[:1], X[1:3]]), 2)), X[:1])  # one-shot


def test_target_flops_spends_the_budget_where_the_output_cares():
    model, X = _two_branches(10.0), torch.randn(600, 6)
    nc = NetworkCompressor(model, target_flops=0.6, batch_size=300).fit(X)
    widths = {row["producer"]: row["width_after"] for row in nc.layers_}
    assert widths["b"] > widths["a"]


def test_split_held_out_leaves_the_first_batch_out():
    from skid.nn._sensitivity import split_held_out

    X = torch.arange(10.0).reshape(5, 2)
    batches = Batches(X, 2)
    rest, held = split_held_out(batches)
    assert torch.equal(held, X[:2]) and rest.n_samples == 3
    assert [b.shape[0] for b in rest] == [2, 1]
    assert torch.equal(rest.first, X[2:4]) and torch.equal(batches.first, X[:2])
    rest, held = split_held_out(Batches([X[:1], X[1:3], X[3:]], 2))
    assert torch.equal(held, X[:1]) and len(list(rest)) == 2
    assert split_held_out(Batches(X, 8)) is None  # one batch
    assert split_held_out(Batches(iter([X[:1], X[1:]]), 2)) is None  # one-shot
