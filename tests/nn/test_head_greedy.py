"""Per-group greedy head candidates at few heads per key/value group."""

import numpy as np
import pytest

from skid.nn._head_greedy import GroupwiseGreedy, groupwise_builders
from skid.nn._heads import AttentionLayout, HeadFactorization, HeadUnit

D = 4
UNIT = HeadUnit("attn", AttentionLayout("q", "k", "v", "o", D), 6, 2)  # 3 heads per group


def _rows(seed):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((200, 10)) @ rng.standard_normal((10, 6 * D))
    return X + rng.standard_normal(X.shape) * 0.3


def _heads():
    return [np.arange(h * D, (h + 1) * D) for h in range(6)]


def test_the_candidates_errors_are_the_least_squares_fit_of_their_heads():
    X = _rows(0)
    for scope in ("own", "all"):
        fac = GroupwiseGreedy(X.T @ X, _heads(), np.arange(6) // 3, (1, 2), scope)
        for blocks in (2, 4):
            kept, columns, T = fac.select(blocks)
            assert np.array_equal(np.bincount(kept // 3, minlength=2), [blocks // 2] * 2)
            residual = X - X[:, columns] @ T
            best = np.linalg.lstsq(X[:, columns], X, rcond=None)[0]
            np.testing.assert_allclose(T, best, atol=1e-8)
            assert fac.errors[blocks] == pytest.approx(
                np.linalg.norm(residual) / np.linalg.norm(X), rel=1e-8)
        assert np.isinf(fac.errors[[0, 1, 3, 5, 6]]).all()  # no candidate at those counts


def test_no_candidates_without_groups_or_with_one_head_per_group():
    assert groupwise_builders(_heads(), np.zeros(6, int)) == {}
    assert groupwise_builders(_heads(), np.arange(6)) == {}


def test_a_per_group_candidate_wins_where_the_rounds_lose():
    X = _rows(13)  # a case where the rounds' first choice misleads the second group's
    fac = HeadFactorization(X.T @ X, UNIT)
    rounds = fac._modes["per_group"].errors[2]
    assert fac.errors[2] < rounds - 0.01
    selection = fac.select(2)
    assert np.array_equal(selection.kv_heads, [0, 1]) and selection.heads.size == 2
    columns = (selection.heads[:, None] * D + np.arange(D)).ravel()
    residual = X - X[:, columns] @ selection.interpolation
    assert selection.error == pytest.approx(np.linalg.norm(residual) / np.linalg.norm(X))
    assert fac.errors[2] == pytest.approx(selection.error)


@pytest.mark.parametrize("seed", range(5))
def test_never_worse_than_the_rounds(seed):
    X = _rows(seed)
    weights = np.random.default_rng(seed).standard_normal((5, 6 * D))
    for weight_gram in (None, weights.T @ weights):
        fac = HeadFactorization(X.T @ X, UNIT, weight_gram)
        rounds = fac._modes["per_group"]
        for k in (2, 4):
            assert fac.errors[k] <= rounds.errors[k] + 1e-12
