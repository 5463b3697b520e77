"""The units' factorizations run concurrently on ``torch.get_num_threads()`` workers and give
exactly the sequential result."""

import threading
import time

import numpy as np
import pytest
import torch

from skid.nn import NetworkCompressor, _calibration, _parallel

from .hf_models import HF_MODELS

pytest.importorskip("transformers")


def _fit(name, threads, **params):
    factory, make_input = HF_MODELS[name]
    torch.manual_seed(0)
    model = factory()
    X = make_input(n=8)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return NetworkCompressor(model, batch_size=4, **params).fit(X)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("name", ["bert", "llama"])
@pytest.mark.parametrize("params", [dict(rank=0.5), dict(rank=0.5, prune="heads"),
                                    dict(tol=0.05, fit_intercept=True)])
def test_two_workers_give_the_sequential_plan_bit_for_bit(monkeypatch, name, params):
    one = _fit(name, 1, **params)
    # the test models' units are narrow: counted as wide, they run side by side
    monkeypatch.setattr(_parallel, "UNITS_SIDE_BY_SIDE_WIDTH", 0)
    pools, run = [], _parallel.map_in_threads

    def counted(function, jobs):
        pools.append(len(jobs))
        return run(function, jobs)

    monkeypatch.setattr(_parallel, "map_in_threads", counted)
    _assert_same_plan(one, _fit(name, 2, **params))
    # a block of heads alone has one unit: its pool has a single job
    assert pools and (max(pools) >= 2 or params.get("prune") == "heads")


def test_narrow_units_run_in_turn_on_the_calling_thread(monkeypatch):
    # below UNITS_SIDE_BY_SIDE_WIDTH a unit's job is small steps that hold the GIL: no pool
    seen, factorize = set(), _calibration._factorize

    def spied(*job):
        seen.add(threading.get_ident())
        return factorize(*job)

    monkeypatch.setattr(_calibration, "_factorize", spied)
    monkeypatch.setattr(_parallel, "map_in_threads", None)  # any pool would fail
    _fit("llama", 2, rank=0.5, prune=("channels", "heads"))
    assert seen == {threading.get_ident()}


@pytest.mark.parametrize("widest", [_parallel.UNITS_SIDE_BY_SIDE_WIDTH - 1,
                                    _parallel.UNITS_SIDE_BY_SIDE_WIDTH])
def test_units_run_side_by_side_from_the_widest_statistic(widest):
    seen = set()

    def job(index):
        seen.add(threading.get_ident())
        time.sleep(0.02)  # long enough that a second worker takes the next job
        return index

    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert _parallel.map_units(job, range(4), [8, widest, 16, 8]) == list(range(4))
    finally:
        torch.set_num_threads(previous)
    if widest < _parallel.UNITS_SIDE_BY_SIDE_WIDTH:
        assert seen == {threading.get_ident()}
    else:
        assert len(seen) == 2 and threading.get_ident() not in seen


@pytest.mark.parametrize("prune", ["heads", ("channels", "heads")])
def test_head_parts_side_by_side_give_the_sequential_plan(monkeypatch, prune):
    # every Gram counts as wide: a head unit's greedy modes and judged candidates run in a
    # pool of their own (with channels too, inside the worker that factorizes the head unit
    # beside the MLP's); grouped-query heads, two batches: the first held out and judged on
    from skid.nn import _parallel

    monkeypatch.setattr(_parallel, "SIDE_BY_SIDE_WIDTH", 10**9)
    one = _fit("llama", 1, rank=0.5, prune=prune)
    pools, run = [], _parallel.map_in_threads

    def counted(function, jobs):
        pools.append(len(jobs))
        return run(function, jobs)

    monkeypatch.setattr(_parallel, "map_in_threads", counted)  # map_for_width's calls only
    monkeypatch.setattr(_parallel, "SIDE_BY_SIDE_WIDTH", 0)
    _assert_same_plan(one, _fit("llama", 2, rank=0.5, prune=prune))
    assert pools and max(pools) >= 2


def _assert_same_plan(one, two):
    assert [r["error"] for r in one.layers_] == [r["error"] for r in two.layers_]
    for a, b in zip(one.plan_.selections, two.plan_.selections, strict=True):
        assert a.unit == b.unit
        for field in ("keep", "heads", "kv_heads", "interpolation", "interpolations",
                      "intercepts", "intercept"):
            _assert_identical(getattr(a, field, None), getattr(b, field, None))


def _assert_identical(a, b):
    if isinstance(a, tuple | list):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_identical(x, y)
    elif a is None:
        assert b is None
    else:
        assert np.array_equal(np.asarray(a), np.asarray(b))

def _jobs(n):
    return [(index, None, None, None) for index in range(n)]


@pytest.fixture
def wide_units(monkeypatch):
    """The placeholder jobs below count as units wide enough to run side by side."""
    monkeypatch.setattr(_calibration, "statistic_width",
                        lambda unit: _parallel.UNITS_SIDE_BY_SIDE_WIDTH)


def test_jobs_run_on_several_threads_in_order(monkeypatch, wide_units):
    seen = set()

    def factorize(index, *rest):
        seen.add(threading.get_ident())
        time.sleep(0.05)  # long enough that a second worker takes the next job
        return index

    monkeypatch.setattr(_calibration, "_factorize", factorize)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert _calibration._factorize_all(_jobs(6)) == list(range(6))
    finally:
        torch.set_num_threads(previous)
    assert len(seen) == 2


def test_the_first_failing_job_in_order_raises(monkeypatch, wide_units):
    def factorize(index, *rest):
        if index >= 2:
            time.sleep(0.05 if index == 2 else 0.0)  # job 3 fails first in time
            raise ValueError(f"job {index}")
        return index

    monkeypatch.setattr(_calibration, "_factorize", factorize)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(ValueError, match="job 2"):
            _calibration._factorize_all(_jobs(5))
    finally:
        torch.set_num_threads(previous)
