"""The corrective least squares (skid/_corrective.py): exact LS fits, error curves, routes."""

import numpy as np
import pytest
import torch

from skid._corrective import SELECTIONS, CrossAccumulator
from skid._linalg import factorize_gram


def paired(n=600, m=12, rank=4, drift=0.05, seed=0):
    """``Z_c``, ``Z_o``: nearly low-rank activations and a perturbed compressed copy."""
    rng = np.random.default_rng(seed)
    Zo = rng.standard_normal((n, rank)) @ rng.standard_normal((rank, m))
    Zo += 0.1 * rng.standard_normal((n, m))
    return Zo + drift * rng.standard_normal((n, m)), Zo


def statistics(Zc, Zo, method="gram", blocks=3, kind=torch.tensor):
    acc = CrossAccumulator(method)
    for c, o in zip(np.array_split(Zc, blocks), np.array_split(Zo, blocks), strict=True):
        acc.update(kind(c), kind(o))
    return acc.statistics()


def relative(Zc, Zo, keep, T):
    return np.linalg.norm(Zo - Zc[:, keep] @ T) / np.linalg.norm(Zo)


@pytest.mark.parametrize("method", ["gram", "qr"])
@pytest.mark.parametrize("selection", SELECTIONS)
@pytest.mark.parametrize("kind", [torch.tensor, np.asarray])
def test_fit_is_the_least_squares_solution_and_the_curve_is_exact(method, selection, kind):
    Zc, Zo = paired()
    fac = statistics(Zc, Zo, method, kind=kind).factorize(selection)
    assert np.all(np.diff(fac.errors) <= 1e-12)
    for k in (1, 3, 4, 7, 12):
        keep, T = fac.select(k)
        assert len(set(keep.tolist())) == k and T.shape == (k, 12)
        best = np.linalg.lstsq(Zc[:, keep], Zo, rcond=None)[0]
        np.testing.assert_allclose(T, best, atol=1e-8)
        assert fac.errors[k] == pytest.approx(relative(Zc, Zo, keep, T), rel=1e-8, abs=1e-10)
    assert fac.errors[12] > 0.01  # the drift cannot be undone: the curve need not reach 0


def test_greedy_picks_the_best_single_channel():
    Zc, Zo = paired(seed=3, drift=0.3)
    fac = statistics(Zc, Zo).factorize("greedy")
    singles = [np.linalg.lstsq(Zc[:, [j]], Zo, rcond=None)[1].sum() for j in range(12)]
    assert fac.perm[0] == int(np.argmin(singles))


@pytest.mark.parametrize("method", ["gram", "qr"])
def test_unchanged_input_gives_the_plain_id(method):
    Zo, _ = paired(drift=0.0)
    acc = CrossAccumulator(method)
    for block in np.array_split(Zo, 3):
        acc.update(torch.tensor(block), torch.tensor(block.copy()))  # equal, not the same
    fac = acc.statistics().factorize("gram")
    plain = factorize_gram(Zo.T @ Zo)
    keep, T = fac.select(5)
    plain_keep, plain_T = plain.select(5)
    np.testing.assert_array_equal(keep, plain_keep)
    np.testing.assert_allclose(T, plain_T, atol=1e-8)
    np.testing.assert_allclose(fac.errors, plain.errors, atol=1e-7)  # sqrt of rounding at 0
    keep, T = fac.select(12)
    np.testing.assert_allclose(T[:, keep], np.eye(12), atol=1e-9)  # full width: T = I


def test_dependent_kept_channels_keep_identity_rows():
    Zc, Zo = paired()
    Zc = np.hstack([Zc, Zc[:, :2]])  # two duplicated channels
    Zo = np.hstack([Zo, Zo[:, :2]])
    fac = statistics(Zc, Zo).factorize("gram")
    assert fac.trusted_rank == 12
    keep, T = fac.select(14)
    assert np.all(np.isfinite(T))
    np.testing.assert_allclose(T[12:, keep[12:]], np.eye(2))
    assert relative(Zc, Zo, keep, T) <= fac.errors[12] + 1e-9


def test_float32_native_products_agree_with_float64():
    Zc, Zo = paired()
    exact = statistics(Zc, Zo).factorize()
    acc = CrossAccumulator("gram", "native")
    acc.update(torch.tensor(Zc, dtype=torch.float32), torch.tensor(Zo, dtype=torch.float32))
    native = acc.statistics()
    assert native.eps == np.finfo(np.float32).eps
    np.testing.assert_allclose(native.factorize().errors, exact.errors, atol=1e-4)


def test_bad_blocks_and_selection():
    acc = CrossAccumulator()
    with pytest.raises(ValueError, match="equal shapes"):
        acc.update(torch.zeros(4, 3), torch.zeros(4, 2))
    acc.update(torch.ones(4, 3), torch.ones(4, 3))
    with pytest.raises(ValueError, match="earlier ones had 3"):
        acc.update(torch.ones(4, 2), torch.ones(4, 2))
    with pytest.raises(ValueError, match="selection must be one of"):
        acc.statistics().factorize("random")
    with pytest.raises(ValueError, match="No data"):
        CrossAccumulator().statistics()


@pytest.mark.parametrize("method", ["gram", "qr"])
def test_fit_for_channels_chosen_elsewhere(method):
    Zc, Zo = paired(seed=5)
    stats = statistics(Zc, Zo, method)
    for chosen in ([3], [7, 0, 11], [1, 2, 4, 5, 6, 8, 9]):
        keep, T, error = stats.fit(chosen)
        assert sorted(keep.tolist()) == sorted(chosen)
        best = np.linalg.lstsq(Zc[:, keep], Zo, rcond=None)[0]
        np.testing.assert_allclose(T, best, atol=1e-8)
        assert error == pytest.approx(relative(Zc, Zo, keep, T), rel=1e-6)
    fac = stats.factorize()
    keep, T, error = stats.fit(fac.perm[:4])
    select_keep, select_T = fac.select(4)
    np.testing.assert_allclose(T[np.argsort(keep)], select_T[np.argsort(select_keep)], atol=1e-8)
    assert error == pytest.approx(fac.errors[4], rel=1e-6)
    with pytest.raises(ValueError, match="distinct channel indices"):
        stats.fit([0, 0])
