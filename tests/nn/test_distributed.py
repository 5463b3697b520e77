"""Data-parallel calibration: two Gloo ranks on shards give the one-process model on all data."""

import os
import shutil
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from skid import NetworkCompressor
from skid.nn import _distributed

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch without distributed")

N_SAMPLES, BATCH = 300, 64
# name -> (compressor settings, rows of rank 0's shard; rank 1 gets the rest)
CASES = {
    "tol": (dict(tol=0.05), 150),
    "rank": (dict(rank=0.4), 150),
    "target_flops": (dict(target_flops=0.4), 150),
    "qr": (dict(tol=0.05, method="qr"), 170),
    "sequential": (dict(rank=0.5, calibration="sequential"), 150),
    "empty_rank0": (dict(tol=0.05), 0),
    "empty_rank1": (dict(target_flops=0.4), N_SAMPLES),
    "blocks": (dict(rank=0.5, calibration="sequential", blocks="layers"), 150),
    "blocks_empty_rank1": (dict(tol=0.05, blocks="layers"), N_SAMPLES),
    "blocks_target_flops": (dict(target_flops=0.4, blocks="layers"), 150),
    "blocks_corrective": (dict(rank=0.5, calibration="corrective", blocks="layers"), 150),
    "corrective": (dict(rank=0.5, calibration="corrective"), 150),
    "corrective_qr": (dict(tol=0.05, calibration="corrective", method="qr"), 170),
    "corrective_empty_rank1": (dict(rank=0.5, calibration="corrective"), N_SAMPLES),
    # grouped-query heads, judged on the first batch (rank 0's): held out on one rank only
    "heads": (dict(rank=1 / 3, prune="heads", blocks=None), 150),
    "heads_blocks_sequential": (dict(rank=1 / 3, prune="heads", calibration="sequential"),
                                150),
    "heads_empty_rank0": (dict(rank=1 / 3, prune="heads"), 0),
}


class Residual(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.up, self.act, self.down = nn.Linear(width, 24), nn.GELU(), nn.Linear(24, width)

    def forward(self, x):
        return x + self.down(self.act(self.up(x)))


class Stack(nn.Module):
    """Units in blocks (``layers``) and a head unit after them."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(10, 12)
        self.layers = nn.ModuleList(Residual(12) for _ in range(3))
        self.head = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 5))

    def forward(self, x):
        x = self.stem(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def make_model_and_data(name="mlp"):
    torch.manual_seed(0)
    if name.startswith("heads"):  # a LLaMA with 6 query heads on 2 key/value heads
        import transformers

        config = transformers.LlamaConfig(
            vocab_size=40, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=32,
            head_dim=8)
        model = transformers.LlamaForCausalLM(config).eval()
        # data on which the held-out judge changes the heads, and would change them again if
        # each rank held out its own first batch
        return model, torch.randint(0, 40, (N_SAMPLES, 8),
                                    generator=torch.Generator().manual_seed(4))
    if name.startswith("blocks"):
        model = Stack().eval()
    else:
        model = nn.Sequential(
            nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 24),
            nn.ReLU(), nn.Linear(24, 5),
        )
    X = torch.randn(N_SAMPLES, 10) @ torch.randn(10, 10)
    return model, X


def summary(nc):
    return {
        "state": {k: v.clone() for k, v in nc.compressed_model_.state_dict().items()},
        "widths": [row["width_after"] for row in nc.layers_],
        "before": [row["width_before"] for row in nc.layers_],
        "n": nc.n_calibration_samples_,
    }


def _rank_main(rank, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2
    )
    try:
        results = {}
        for name, (params, split) in CASES.items():
            model, X = make_model_and_data(name)
            shard = X[:split] if rank == 0 else X[split:]
            nc = NetworkCompressor(model, batch_size=BATCH, **params).fit(shard)
            results[name] = summary(nc)
        model, X = make_model_and_data()
        # memory=: a cache per rank; all ranks read it, or all compute (no rank left waiting)
        cache = os.path.join(out_dir, f"cache{rank}")
        shard = X[:150] if rank == 0 else X[150:]
        before = _distributed.reduced_bytes()
        NetworkCompressor(model, tol=0.05, memory=cache, batch_size=BATCH).fit(shard)
        results["traffic"] = _distributed.reduced_bytes() - before
        if rank == 1:
            shutil.rmtree(cache)  # rank 0 hits its cache, rank 1 misses: both must compute
        nc = NetworkCompressor(model, tol=0.05, memory=cache, batch_size=BATCH).fit(shard)
        results["memory_miss_on_one_rank"] = summary(nc)
        nc = NetworkCompressor(model, tol=0.1, memory=cache, batch_size=BATCH).fit(shard)
        results["memory_hit"] = summary(nc)
        results["memory_hit_passes"] = nc.n_calibration_passes_
        # block-wise with memory=: each rank's block outputs are its own (keyed by rank)
        model, X = make_model_and_data("blocks")
        cache = os.path.join(out_dir, f"blocks_cache{rank}")
        shard = X[:150] if rank == 0 else X[150:]
        for _ in range(2):  # the second fit reads statistics and block outputs back
            nc = NetworkCompressor(model, rank=0.5, calibration="sequential", memory=cache,
                                   batch_size=BATCH).fit(shard)
        results["blocks_memory"] = summary(nc)
        results["blocks_memory_passes"] = nc.n_calibration_passes_
        results["block_outputs"] = sorted(
            os.listdir(os.path.join(cache, "joblib", "skid_block_outputs")))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # both ranks done before either tears Gloo down
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(rank_main, out_dir: str, seconds: int, poll: float) -> list:
    """Run ``rank_main(rank, port, out_dir)`` on two spawned ranks; their ``rank{r}.pt``."""
    context = mp.start_processes(
        rank_main, args=(free_port(), out_dir), nprocs=2, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + seconds
    while not context.join(timeout=poll):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the two ranks did not finish within {seconds} s (a collective hung?)")
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(2)]


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    return run_ranks(_rank_main, str(tmp_path_factory.mktemp("ranks")), 300, 5)


def assert_same_model(result, reference):
    assert result["widths"] == reference["widths"]
    assert result["n"] == reference["n"]
    assert result["state"].keys() == reference["state"].keys()
    for key, tensor in reference["state"].items():
        torch.testing.assert_close(result["state"][key], tensor, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_ranks_on_shards_equal_one_process_on_all_data(rank_results, name):
    model, X = make_model_and_data(name)
    params, _ = CASES[name]
    reference = summary(NetworkCompressor(model, batch_size=BATCH, **params).fit(X))
    assert sum(reference["widths"]) < sum(reference["before"]), "the case compresses nothing"
    for result in rank_results:
        assert_same_model(result[name], reference)


@pytest.mark.slow
def test_memory_cache_is_read_or_computed_by_all_ranks_together(rank_results):
    model, X = make_model_and_data()
    for tol, name in ((0.05, "memory_miss_on_one_rank"), (0.1, "memory_hit")):
        reference = summary(NetworkCompressor(model, tol=tol, batch_size=BATCH).fit(X))
        for result in rank_results:
            assert_same_model(result[name], reference)
    assert [r["memory_hit_passes"] for r in rank_results] == [0, 0]


@pytest.mark.slow
def test_block_outputs_under_memory_are_each_ranks_own(rank_results):
    model, X = make_model_and_data("blocks")
    reference = summary(NetworkCompressor(model, rank=0.5, calibration="sequential",
                                          batch_size=BATCH).fit(X))
    for result in rank_results:
        assert_same_model(result["blocks_memory"], reference)
        assert result["blocks_memory_passes"] == 0 and result["block_outputs"]
    keys = [set(r["block_outputs"]) for r in rank_results]
    assert not keys[0] & keys[1]  # the same step, other rows: other keys


@pytest.mark.slow
def test_statistics_traffic_is_the_gram_triangles(rank_results):
    """Per rank: the upper triangle of one float64 Gram per unit (m (m + 1) / 2 entries, about
    half of the m × m Gram) plus the counts, whatever the data size."""
    triangles = 8 * (32 * 33 // 2 + 32 * 33 // 2 + 24 * 25 // 2)
    counts = 8 * (1 + 3)
    assert [r["traffic"] for r in rank_results] == [triangles + counts] * 2


def test_without_initialised_group_auto_and_none_are_single_process():
    assert _distributed.resolve("auto") is None
    assert _distributed.resolve(None) is None
    model, X = make_model_and_data()
    nc = NetworkCompressor(model, rank=0.5, process_group=None).fit(X)
    assert nc.n_calibration_samples_ == N_SAMPLES


def test_bad_process_group_is_rejected():
    model, X = make_model_and_data()
    with pytest.raises(ValueError, match="process_group"):
        NetworkCompressor(model, process_group="world").fit(X)
    with pytest.raises(ValueError, match="empty"):
        NetworkCompressor(model).fit(X[:0])  # an empty shard is an error without a group
