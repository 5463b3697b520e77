"""Few-head selection judged on held-out calibration rows (issue 17 item 2)."""

import numpy as np
import pytest
import torch

from skid._linalg import BlockPivotedFactorization
from skid.nn import NetworkCompressor
from skid.nn._head_discovery import find_heads
from skid.nn._head_judge import HeldOutGrams, held_out_error, judged_on_held_out
from skid.nn._heads import AttentionLayout, HeadFactorization, HeadUnit, _modes

D = 4
UNIT = HeadUnit("attn", AttentionLayout("q", "k", "v", "o", D), 6, 2)  # 3 heads per group


def _rows(rng, n):
    X = rng.standard_normal((n, 10)) @ rng.standard_normal((10, 6 * D))
    return X + rng.standard_normal(X.shape) * 0.3


def _split(seed=1):
    """Rows the candidates are built on, and held-out rows of another mixture (fewer)."""
    rng = np.random.default_rng(seed)
    return _rows(rng, 200), _rows(rng, 20)


def _columns(heads):
    return (np.asarray(heads)[:, None] * D + np.arange(D)).ravel()


def _fold_error(X, columns, T):
    return np.linalg.norm(X - X[:, columns] @ T) / np.linalg.norm(X)


@pytest.mark.parametrize("weighted", [False, True])
def test_the_held_out_error_is_the_folds_error_on_those_rows(weighted):
    rest, held = _split()
    columns = _columns([0, 4])
    T = np.linalg.lstsq(rest[:, columns], rest, rcond=None)[0]
    W = np.random.default_rng(0).standard_normal((7, 6 * D))
    expected = (np.linalg.norm((held - held[:, columns] @ T) @ W.T) / np.linalg.norm(held @ W.T)
                if weighted else _fold_error(held, columns, T))
    found = held_out_error(held.T @ held, columns, T, W.T @ W if weighted else None)
    assert found == pytest.approx(expected, rel=1e-9)


def test_the_candidate_the_held_out_rows_prefer_wins_over_the_in_sample_one():
    rest, held = _split()
    X = np.vstack([held, rest])
    gram, held_out = HeldOutGrams.combined(rest.T @ rest, 0, held.T @ held, 0)
    np.testing.assert_allclose(gram, X.T @ X, rtol=1e-12, atol=1e-9)
    in_sample = HeadFactorization(gram, UNIT).select(2)  # one batch: today's choice
    judged = HeadFactorization(gram, UNIT, held_out=held_out).select(2)
    assert not np.array_equal(in_sample.heads, judged.heads)
    # on all rows, the in-sample choice is the better fold...
    assert in_sample.error < judged.error
    # ...but among the candidates built without the held-out rows, the judged one's heads
    # reconstruct those rows best
    held_errors = {}
    for mode, fac in _modes(rest.T @ rest, UNIT, None).items():
        if mode != "groups" and np.isfinite(fac.errors[2]):  # one head per group
            _, columns, T = fac.select(2)
            held_errors[tuple(np.unique(columns // D))] = _fold_error(held, columns, T)
    assert len(held_errors) > 1
    assert min(held_errors, key=held_errors.get) == tuple(judged.heads)
    # its T is fitted on all rows, its error exact there
    columns = _columns(judged.heads)
    np.testing.assert_allclose(judged.interpolation,
                               np.linalg.lstsq(X[:, columns], X, rcond=None)[0], atol=1e-8)
    assert judged.error == pytest.approx(_fold_error(X, columns, judged.interpolation), rel=1e-8)
    assert np.array_equal(judged.kv_heads, [0, 1])


def test_held_out_rows_like_the_rest_keep_the_in_sample_choice():
    rest, _ = _split()
    gram = rest.T @ rest  # the held-out rows' Gram a multiple of the rest's: same judge
    fac = HeadFactorization(gram, UNIT)
    judged = HeadFactorization(gram, UNIT, held_out=HeldOutGrams(gram / 4, 3 * gram / 4))
    for k in (2, 4, 6):
        np.testing.assert_array_equal(judged.select(k).heads, fac.select(k).heads)
        assert judged.select(k).error == pytest.approx(fac.select(k).error, rel=1e-9)
    np.testing.assert_allclose(judged.errors, fac.errors, rtol=1e-9)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_on_all_rows_only_the_modes_of_counts_the_judge_left_open_are_built(
        monkeypatch, seed, weighted):
    """Every mode is built without the held-out rows, and on all rows only those offering a
    count below all heads that the judge did not decide; every count gets the selection, T
    and error that building every mode on both gives."""
    from skid.nn import _heads

    rest, held = _split(seed)
    W = np.random.default_rng(seed).standard_normal((7, 6 * D)) if weighted else None
    gram, held_out = HeldOutGrams.combined(rest.T @ rest, 0, held.T @ held, 0,
                                           None if W is None else W.T @ W)
    weight_gram = None if W is None else W.T @ W
    built, decided = [], []

    def recording(gram, unit, weight_gram, wanted=None):
        modes = _modes(gram, unit, weight_gram, wanted)
        built.append(sorted(modes))
        return modes

    def judging(*args):
        winners = judged_on_held_out(*args)
        decided.append(set(winners))
        return winners

    monkeypatch.setattr(_heads, "_modes", recording)
    monkeypatch.setattr(_heads, "judged_on_held_out", judging)
    fac = HeadFactorization(gram, UNIT, weight_gram, held_out)
    monkeypatch.setattr(_heads, "_modes", lambda gram, unit, weight_gram, wanted=None: _modes(
        gram, unit, weight_gram))
    every = HeadFactorization(gram, UNIT, weight_gram, held_out)
    # 3 heads per group: 2 and 4 heads offered by the rounds and both per-group greedies,
    # 3 by whole groups alone, all 6 by any (the identity, from no mode)
    offering = {2: {"per_group", "per_group_own", "per_group_all"}, 3: {"groups"}}
    offering[4] = offering[2]
    assert built[0] == ["groups", "per_group", "per_group_all", "per_group_own"]
    assert decided[0] <= {2, 4}
    assert set(built[1]) == set().union(*(m for k, m in offering.items() if k not in decided[0]))
    np.testing.assert_array_equal(fac.errors, every.errors)
    assert fac.valid_counts == every.valid_counts == [2, 3, 4, 6]
    for k in range(1, 7):
        a, b = fac.select(k), every.select(k)
        np.testing.assert_array_equal(a.heads, b.heads)
        np.testing.assert_array_equal(a.interpolation, b.interpolation)
        assert a.error == b.error


def test_the_judge_deciding_every_contested_count_leaves_whole_groups_alone_to_build(
        monkeypatch):
    """Where the held-out batch picks the heads at both contested counts (for some of the
    seeds above), the per-group candidates and the rounds are never built on all rows."""
    from skid.nn import _heads

    built = []

    def recording(*args):
        modes = _modes(*args)
        built.append(sorted(modes))
        return modes

    monkeypatch.setattr(_heads, "_modes", recording)
    for seed in (1, 2, 3, 4):
        rest, held = _split(seed)
        gram, held_out = HeldOutGrams.combined(rest.T @ rest, 0, held.T @ held, 0)
        HeadFactorization(gram, UNIT, held_out=held_out)
    assert len(built) == 8  # without the held-out rows, then on all rows, for each seed
    assert ["groups"] in built[1::2]


def test_all_heads_keep_the_identity_whatever_mode_offered_them():
    rest, held = _split()
    gram, held_out = HeldOutGrams.combined(rest.T @ rest, 0, held.T @ held, 0)
    for fac in (HeadFactorization(gram, UNIT), HeadFactorization(gram, UNIT, held_out=held_out)):
        selection = fac.select(6)
        np.testing.assert_array_equal(selection.heads, np.arange(6))
        np.testing.assert_array_equal(selection.kv_heads, [0, 1])
        np.testing.assert_array_equal(selection.interpolation, np.eye(6 * D))
        assert selection.error == 0.0 and fac.errors[6] == 0.0
        # what the rounds' factorization gives keeping every block, columns in order
        _, columns, T = BlockPivotedFactorization(gram, [_columns([h]) for h in range(6)]
                                                  ).select(6)
        np.testing.assert_array_equal(T[np.argsort(columns)], selection.interpolation)


# ------------------------------------------------------------------ through the compressor

transformers = pytest.importorskip("transformers")


def _llama(layers=2):
    config = transformers.LlamaConfig(
        vocab_size=40, hidden_size=48, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=32, head_dim=8)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def _ids(n=16, length=10, seed=0):
    return torch.randint(0, 40, (n, length), generator=torch.Generator().manual_seed(seed))


def _expected(model, ids, batch_size, held):
    """Per block: the head factorization from Grams of the original model's output-projection
    inputs, the first batch held out (``held``) or not."""
    units, _ = find_heads(model, (ids[:2],), {})
    grams = {u.attention: [] for u in units}
    handles = [model.get_submodule(u.consumer).register_forward_pre_hook(
        lambda m, a, u=u: grams[u.attention].append(
            a[0].reshape(-1, a[0].shape[-1]).double().T @ a[0].reshape(-1, a[0].shape[-1])
            .double()))
        for u in units]
    with torch.no_grad():
        for batch in ids.split(batch_size):
            model(batch)
    for handle in handles:
        handle.remove()
    facs = {}
    for u in units:
        if not held:
            facs[u.attention] = HeadFactorization(sum(grams[u.attention]).numpy(), u)
            continue
        first, rest = grams[u.attention][0].numpy(), sum(grams[u.attention][1:]).numpy()
        W = model.get_submodule(u.consumer).weight.detach().double().numpy()
        gram, held_out = HeldOutGrams.combined(rest, 0, first, 0, W.T @ W)
        facs[u.attention] = HeadFactorization(gram, u, held_out=held_out)
    return facs


def _heads(nc):
    return {s.unit.attention: s.heads for s in nc.plan_.selections}


def test_the_compressor_judges_heads_on_its_first_batch():
    model, ids = _llama(), _ids(seed=3)
    nc = NetworkCompressor(model, rank=1 / 3, prune="heads", batch_size=4,
                           blocks=None).fit(ids)
    judged = {name: fac.select(2) for name, fac in _expected(model, ids, 4, True).items()}
    in_sample = {name: fac.select(2) for name, fac in _expected(model, ids, 4, False).items()}
    assert any(not np.array_equal(judged[n].heads, in_sample[n].heads) for n in judged)
    for selection in nc.plan_.selections:
        expected = judged[selection.unit.attention]
        np.testing.assert_array_equal(selection.heads, expected.heads)
        np.testing.assert_allclose(np.asarray(selection.interpolation),
                                   expected.interpolation, atol=1e-4)  # float32 products


def test_one_batch_keeps_the_exact_error_choice():
    model, ids = _llama(), _ids(seed=3)
    nc = NetworkCompressor(model, rank=1 / 3, prune="heads", batch_size=16,
                           blocks=None).fit(ids)
    expected = {n: f.select(2) for n, f in _expected(model, ids, 16, False).items()}
    for selection in nc.plan_.selections:
        np.testing.assert_array_equal(selection.heads, expected[selection.unit.attention].heads)


@pytest.mark.parametrize("calibration", ["original", "sequential", "corrective"])
def test_blockwise_equals_one_pass(calibration):
    model, ids = _llama(layers=3), _ids(seed=3)
    fits = [NetworkCompressor(model, rank=1 / 3, prune="heads", batch_size=4, blocks=blocks,
                              calibration=calibration).fit(ids) for blocks in ("auto", None)]
    assert fits[0].blocks_ == "model.layers" and fits[1].blocks_ is None
    assert _heads(fits[0]).keys() == _heads(fits[1]).keys()
    for name, heads in _heads(fits[0]).items():
        np.testing.assert_array_equal(heads, _heads(fits[1])[name])
    one, other = (f.compressed_model_.state_dict() for f in fits)
    for key, tensor in one.items():
        torch.testing.assert_close(tensor, other[key], atol=1e-5, rtol=1e-5, msg=key)


def test_wide_grams_build_their_modes_and_judge_side_by_side_bit_for_bit(monkeypatch):
    # from SIDE_BY_SIDE_WIDTH the modes, the judged folds and their held-out errors run on
    # worker threads: the same arithmetic, so the same choice, errors and T to the last bit
    import threading

    from skid.nn import _parallel

    rest, held = _split()
    W = np.random.default_rng(4).standard_normal((9, 6 * D))
    gram, held_out = HeldOutGrams.combined(rest.T @ rest, 0, held.T @ held, 0, W.T @ W)

    def fitted():
        fac = HeadFactorization(gram, UNIT, held_out=held_out)
        return fac.errors, [fac.select(k) for k in (2, 4, 6)]

    monkeypatch.setattr(_parallel, "SIDE_BY_SIDE_WIDTH", 10**9)
    errors, selections = fitted()
    workers, run = set(), _parallel.map_in_threads

    def spied(function, jobs):
        def job_in_a_worker(job):
            workers.add(threading.get_ident())
            return function(job)
        return run(job_in_a_worker, jobs)

    monkeypatch.setattr(_parallel, "map_in_threads", spied)
    monkeypatch.setattr(_parallel, "SIDE_BY_SIDE_WIDTH", 0)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        side_errors, side_selections = fitted()
    finally:
        torch.set_num_threads(threads)
    assert workers - {threading.get_ident()}  # the parts ran on the pool's threads
    np.testing.assert_array_equal(side_errors, errors)
    for found, expected in zip(side_selections, selections, strict=True):
        np.testing.assert_array_equal(found.heads, expected.heads)
        np.testing.assert_array_equal(found.interpolation, expected.interpolation)
        assert found.error == expected.error
