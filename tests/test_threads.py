"""The one-BLAS-thread limit of the small m × m steps, entered from several threads at once."""

import threading

import pytest

from skid._linalg import one_blas_thread, small_step

threadpoolctl = pytest.importorskip("threadpoolctl")


def _blas_threads():
    return [p["num_threads"] for p in threadpoolctl.threadpool_info()
            if p["user_api"] == "blas"]


@pytest.fixture
def two_blas_threads():
    if not _blas_threads():
        pytest.skip("no BLAS library that threadpoolctl controls")
    with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):
        if set(_blas_threads()) != {2}:
            pytest.skip("BLAS does not take two threads")
        yield


def test_interleaved_entries_restore_the_original_limits(two_blas_threads):
    # A enters, B enters, A leaves, B leaves: B must not restore the 1 that A had set
    entered, left, inside = threading.Event(), threading.Event(), []

    def second():
        with small_step(8):
            entered.set()
            left.wait(10)
            inside.append(_blas_threads())

    thread = threading.Thread(target=second)
    with small_step(8):
        thread.start()
        entered.wait(10)
    left.set()
    thread.join(20)
    assert inside and set(inside[0]) == {1}  # still limited while B is inside
    assert set(_blas_threads()) == {2}


def test_many_concurrent_entries_restore_the_original_limits(two_blas_threads):
    barrier = threading.Barrier(4)

    def work():
        for _ in range(20):
            with one_blas_thread():
                barrier.wait(10)
                assert set(_blas_threads()) == {1}
            barrier.wait(10)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert set(_blas_threads()) == {2}


def test_large_steps_are_not_limited(two_blas_threads):
    with small_step(4096):
        assert set(_blas_threads()) == {2}


def test_libraries_on_one_thread_already_are_left_alone(monkeypatch):
    from skid._linalg import _threads

    libraries = _threads._blas_libraries()
    if not libraries:
        pytest.skip("no BLAS library that threadpoolctl controls")
    calls = []
    for library in libraries:
        monkeypatch.setattr(library, "set_num_threads", calls.append, raising=False)
    with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
        if set(_blas_threads()) != {1}:
            pytest.skip("BLAS does not take one thread")
        with small_step(8), small_step(8):
            pass
    assert calls == []  # nothing to set, nothing to restore


def test_head_selection_runs_its_small_solves_on_one_blas_thread(two_blas_threads,
                                                                 monkeypatch):
    # the head greedy and its judge solve with hundreds of small blocks: each call on two
    # BLAS threads woke the other one (measured up to 18× the time of the selection)
    import numpy as np

    from skid._linalg import _psd
    from skid.nn import _head_greedy
    from skid.nn._head_judge import HeldOutGrams
    from skid.nn._heads import AttentionLayout, HeadFactorization, HeadUnit

    seen = []
    solve = _psd.pinvh_solve

    def spy(A, B):
        seen.append(tuple(_blas_threads()))
        return solve(A, B)

    monkeypatch.setattr(_psd, "pinvh_solve", spy)  # the folds' (least_squares_fold)
    monkeypatch.setattr(_head_greedy, "pinvh_solve", spy)  # the exact errors'
    unit = HeadUnit("attn", AttentionLayout("q", "k", "v", "o", 4), 6, 2)  # 3 heads per group
    rng = np.random.default_rng(0)
    X = rng.standard_normal((300, 24))
    gram, rest = X.T @ X, X[20:].T @ X[20:]
    fac = HeadFactorization(gram, unit, held_out=HeldOutGrams(gram - rest, rest))
    built = len(seen)
    fac.select(2)  # one head per group: a per-group candidate's fold
    assert built and len(seen) > built
    assert set(seen) == {(1,) * len(_blas_threads())}
    assert set(_blas_threads()) == {2}  # and the limit is lifted after
