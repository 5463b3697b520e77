"""Two Gloo ranks that disagree fail fast and alike; partial cache hits never hang a rank."""

import os
import pathlib
import shutil
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from skid import NetworkCompressor
from skid.nn import _distributed

from .test_distributed import BATCH, free_port, make_model_and_data, summary

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch without distributed")

MODES = {  # name -> settings; each fitted with memory=, then again after rank 1 lost part
    "original": dict(tol=0.05, blocks=None),
    "sequential": dict(rank=0.5, calibration="sequential", blocks=None),
    "corrective": dict(rank=0.5, calibration="corrective", blocks=None),
    "blocks_original": dict(rank=0.5, blocks="layers"),
    "blocks_sequential": dict(rank=0.5, calibration="sequential", blocks="layers"),
    "blocks_corrective": dict(rank=0.5, calibration="corrective", blocks="layers"),
}


def _disagreeing(rank, name):
    """The model and settings each rank is given in a case where they differ."""
    torch.manual_seed(0)
    model, X = make_model_and_data()
    settings = dict(rank=0.5, batch_size=BATCH)
    if rank == 1 and name == "architecture":
        model[2] = torch.nn.Linear(32, 30)
        model[4] = torch.nn.Linear(30, 24)
    if rank == 1 and name == "weights":
        with torch.no_grad():
            model[2].weight[0, 0] += 1e-3
    if rank == 1 and name == "settings":
        settings["rank"] = 0.4
    return model, X[:150] if rank == 0 else X[150:], settings


def _forget_half(folder):
    """Remove every other cached entry (statistics, corrective statistics, block outputs)."""
    root = pathlib.Path(folder)
    for function in [p for p in root.rglob("*") if p.is_dir() and p.name.startswith("_keyed")]:
        for entry in sorted(p for p in function.iterdir() if p.is_dir())[::2]:
            shutil.rmtree(entry)
    tapes = root / "joblib" / "skid_block_outputs"
    if tapes.exists():
        for entry in sorted(tapes.iterdir())[::2]:
            shutil.rmtree(entry)


def _rank_main(rank, port, out_dir):
    torch.set_num_threads(1)
    os.environ["SKID_COLLECTIVE_TIMEOUT"] = "60"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    results = {}
    for name in ("architecture", "weights", "settings"):
        model, shard, settings = _disagreeing(rank, name)
        start = time.monotonic()
        try:
            NetworkCompressor(model, **settings).fit(shard)
            results[name] = ("no error", 0.0)
        except ValueError as exc:
            results[name] = (str(exc), time.monotonic() - start)
    for name, settings in MODES.items():
        model, X = make_model_and_data("blocks")
        shard = X[:150] if rank == 0 else X[150:]
        cache = os.path.join(out_dir, f"{name}{rank}")
        NetworkCompressor(model, batch_size=BATCH, memory=cache, **settings).fit(shard)
        if rank == 1:
            _forget_half(cache)
        nc = NetworkCompressor(model, batch_size=BATCH, memory=cache, **settings).fit(shard)
        results[name] = summary(nc)
    dist.barrier()
    # a collective the other rank never joins: a bounded wait and a message
    os.environ["SKID_COLLECTIVE_TIMEOUT"] = "2"
    if rank == 0:
        start = time.monotonic()
        with _distributed.active(dist.group.WORLD):
            try:
                _distributed.all_hit(True)
                results["timeout"] = ("no error", 0.0)
            except TimeoutError as exc:
                results["timeout"] = (str(exc), time.monotonic() - start)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    if rank == 1:
        time.sleep(5)  # still there while rank 0 waits in vain
    os._exit(0)  # Gloo cannot be torn down cleanly after an abandoned collective


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("ranks"))
    context = mp.start_processes(
        _rank_main, args=(free_port(), out_dir), nprocs=2, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + 240
    while not context.join(timeout=2):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the two ranks did not finish within 240 s (a collective hung?)")
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize("what", ["architecture", "weights", "settings"])
def test_ranks_given_different_models_or_settings_fail_alike_within_seconds(rank_results,
                                                                            what):
    (message0, seconds0), (message1, seconds1) = (r[what] for r in rank_results)
    assert message0 == message1
    assert f"differ in their {what}" in message0 and "rank(s) [1] differ from rank 0" in message0
    assert seconds0 < 10 and seconds1 < 10


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(MODES))
def test_a_cache_hit_on_one_rank_only_gives_the_one_process_model(rank_results, mode):
    from .test_distributed import assert_same_model

    model, X = make_model_and_data("blocks")
    reference = summary(NetworkCompressor(model, batch_size=BATCH, **MODES[mode]).fit(X))
    for result in rank_results:
        assert_same_model(result[mode], reference)


@pytest.mark.slow
def test_a_collective_no_other_rank_joins_times_out_with_a_message(rank_results):
    message, seconds = rank_results[0]["timeout"]
    assert "rank 0 of 2 waited 2 s for the other ranks" in message
    assert seconds < 10
