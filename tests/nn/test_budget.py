"""Widths from tol / rank / target_flops on synthetic error curves."""

import numpy as np
import pytest

from skid.nn._budget import (
    FlopsModel,
    _greedy,
    _objective,
    _uniform,
    widths_for_flops,
    widths_for_rank,
    widths_for_tol,
)
from skid.nn._plan import Unit


def curve(spectrum):
    """Relative ID error of a matrix with orthogonal columns of these norms, keeping 0..m."""
    s2 = np.asarray(spectrum, dtype=float) ** 2
    tail = np.concatenate([np.cumsum(s2[::-1])[::-1], [0.0]])
    return np.sqrt(tail / tail[0])


def chain(widths, layer_flops):
    """Units of a plain stack l0 -> l1 -> ... (l_i consumes unit i-1 and produces unit i)."""
    units = [Unit(f"l{i}", f"l{i + 1}", m) for i, m in enumerate(widths)]
    flops = {f"l{i}": f for i, f in enumerate(layer_flops)}
    return units, FlopsModel.from_units(units, flops, sum(flops.values()) + 1000.0)


@pytest.fixture
def vgg_like():
    """Five chained units with decaying spectra; the conv-like layers dominate the FLOPs."""
    rng = np.random.default_rng(0)
    widths = [16, 32, 64, 128, 256]
    units, flops = chain(widths, [1e6, 8e6, 8e6, 8e6, 4e6, 1e5])
    decays = [0.05, 0.1, 0.05, 0.03, 0.02]
    errors = [
        curve(np.sort(np.exp(-d * np.arange(m)) * (1 + 0.1 * rng.random(m)))[::-1])
        for m, d in zip(widths, decays, strict=True)
    ]
    return errors, flops


def test_tol_smallest_width_meeting_the_error():
    errors = [np.array([1.0, 0.5, 0.1, 0.01, 0.0]), np.array([1.0, 1e-3, 0.0])]
    assert widths_for_tol(errors, 0.1).tolist() == [2, 1]
    assert widths_for_tol(errors, 0.05).tolist() == [3, 1]
    assert widths_for_tol(errors, 0.0).tolist() == [4, 2]


def test_tol_keeps_at_least_one_channel_of_a_zero_matrix():
    assert widths_for_tol([np.zeros(4)], 0.5).tolist() == [1]


def test_rank_is_a_ceiled_fraction_with_at_least_one():
    assert widths_for_rank([30, 7, 1], 0.1).tolist() == [3, 1, 1]
    assert widths_for_rank([30, 7, 1], 1.0).tolist() == [30, 7, 1]
    assert widths_for_rank([10], 0.55).tolist() == [6]


def test_flops_model_scales_each_module_with_the_units_it_touches():
    units = [Unit("a", "b", 4, passthroughs=("dw",)), Unit("b", "c", 10)]
    flops = FlopsModel.from_units(units, {"a": 40.0, "dw": 8.0, "b": 100.0, "c": 20.0}, 200.0)
    assert flops.total == pytest.approx(200.0)
    assert flops([4, 10]) == pytest.approx(200.0)
    # b consumes unit 0 and produces unit 1: its FLOPs scale with both kept fractions
    expected = 32.0 + 40 * 0.5 + 8 * 0.5 + 100 * 0.5 * 0.3 + 20 * 0.3
    assert flops([2, 3]) == pytest.approx(expected)
    assert flops.channel_cost([2, 3], 1) == pytest.approx(flops([2, 4]) - flops([2, 3]))


@pytest.mark.parametrize("target", [0.2, 0.35, 0.5, 0.8])
def test_target_flops_meets_the_budget_tightly(vgg_like, target):
    errors, flops = vgg_like
    kept = widths_for_flops(errors, flops, target)
    assert flops(kept) <= target * flops.total
    assert flops(kept) >= (target - 0.02) * flops.total
    assert np.all((kept >= 1) & (kept <= flops.widths))


@pytest.mark.parametrize("target", [0.2, 0.35, 0.5, 0.8])
def test_target_flops_beats_or_ties_the_uniform_fraction(vgg_like, target):
    errors, flops = vgg_like
    kept = widths_for_flops(errors, flops, target)
    uniform = _uniform(flops, target * flops.total)
    assert flops(uniform) <= target * flops.total
    assert _objective(errors, kept) <= _objective(errors, uniform)
    # on these curves the per-unit allocation is much better, not just a tie
    assert _objective(errors, kept) < 0.8 * _objective(errors, uniform)


def test_falls_back_to_uniform_when_the_greedy_does_worse():
    # a unit whose error drops only at the very last channel misleads any greedy
    errors = [np.r_[1.0, np.full(9, 0.99), 0.0], curve(np.exp(-0.3 * np.arange(10)))]
    units = [Unit("a0", "b0", 10), Unit("a1", "b1", 10)]
    flops = FlopsModel.from_units(units, {"a0": 1.0, "b0": 1.0, "a1": 1.0, "b1": 1.0}, 4.0)
    for target in (0.3, 0.6, 0.9):
        kept = widths_for_flops(errors, flops, target)
        uniform = _uniform(flops, target * flops.total)
        assert _objective(errors, kept) <= _objective(errors, uniform)
    # at 0.6 the greedy spends everything on unit 0's plateau; the uniform split wins
    assert widths_for_flops(errors, flops, 0.6).tolist() == [6, 6]


def test_monotone_in_target(vgg_like):
    errors, flops = vgg_like
    targets = np.linspace(0.15, 0.95, 17)
    allocations = [widths_for_flops(errors, flops, t) for t in targets]
    spent = [flops(k) for k in allocations]
    objective = [_objective(errors, k) for k in allocations]
    assert np.all(np.diff(spent) >= 0)
    assert np.all(np.diff(objective) <= 1e-12)


def test_squared_error_does_not_starve_an_expensive_layer():
    # unit 0: few channels, many FLOPs each, flat spectrum; unit 1: cheap channels, decaying.
    # Plain error per FLOP (the greedy on sqrt of the curves) cuts unit 0 to one channel.
    units = [Unit("a0", "b0", 16), Unit("a1", "b1", 64)]
    flops = FlopsModel.from_units(units, {"a0": 4e6, "b0": 4e6, "a1": 1e6, "b1": 1e6}, 1e7)
    errors = [curve(np.ones(16)), curve(np.exp(-0.05 * np.arange(64)))]
    plain = _greedy([np.sqrt(e) for e in errors], flops, 0.25 * flops.total)
    kept = widths_for_flops(errors, flops, 0.25)
    assert plain[0] == 1
    assert kept[0] >= 3
    assert _objective(errors, kept) < _objective(errors, plain)


def test_unreachable_target_says_the_smallest_fraction():
    units, flops = chain([8, 8], [100.0, 100.0, 100.0])
    errors = [curve(np.ones(8))] * 2
    with pytest.raises(ValueError, match=r"at least that.*|cannot be reached: .* 0\.0"):
        widths_for_flops(errors, flops, 0.01)
    smallest = flops([1, 1]) / flops.total
    kept = widths_for_flops(errors, flops, smallest)
    assert kept.tolist() == [1, 1]


def test_units_without_flops_are_kept_whole():
    units = [Unit("a0", "b0", 8), Unit("a1", "b1", 8)]
    flops = FlopsModel.from_units(units, {"a0": 10.0, "b0": 10.0}, 20.0)
    errors = [curve(np.ones(8)), curve(np.ones(8))]
    kept = widths_for_flops(errors, flops, 0.5)
    assert kept[1] == 8
    assert flops(kept) <= 10.0


def test_output_weights_steer_the_greedy_to_the_cheap_unit(vgg_like):
    """Equal curves, but unit 0's error costs the output 100 times as much: the weighted greedy
    (first candidate) keeps more of unit 0 than the unweighted one does."""
    from skid.nn._budget import flops_candidates

    units, flops = chain([32, 32], [1e6, 1e6, 1e6])
    errors = [curve(np.exp(-0.1 * np.arange(32)))] * 2
    plain = flops_candidates(errors, flops, 0.5)
    weighted = flops_candidates(errors, flops, 0.5, weights=[100.0, 1.0])
    assert weighted[0][0] > weighted[0][1]
    assert not any(np.array_equal(weighted[0], c) for c in plain)
    assert flops(weighted[0]) <= 0.5 * flops.total
    with pytest.raises(ValueError, match="one finite nonnegative number per unit"):
        flops_candidates(errors, flops, 0.5, weights=[1.0])


def test_each_kind_alone_is_a_candidate():
    from skid.nn._budget import flops_candidates

    units, flops = chain([16, 16, 16], [1e6, 1e6, 1e6, 1e6])
    errors = [curve(np.exp(-0.2 * np.arange(16)))] * 3
    candidates = flops_candidates(errors, flops, 0.7, kinds=["heads", "channels", "channels"])
    alone = [c for c in candidates if c[0] == 16 and c[1] == c[2] < 16]
    assert alone and flops(alone[0]) <= 0.7 * flops.total
    assert any(c[0] < 16 and c[1] == c[2] == 16 for c in candidates)  # the heads alone
    # one kind only: nothing added
    assert len(flops_candidates(errors, flops, 0.7, kinds=["channels"] * 3)) == len(
        flops_candidates(errors, flops, 0.7))
