"""Block-wise calibration: finding the blocks, same result as one pass, one block on the device."""

import pytest
import torch
from torch import nn

from skid import NetworkCompressor
from skid._linalg import GramAccumulator
from skid.nn import _blocks, _tapes
from skid.nn._calibration import calibration_passes

from .models import make_bert_layer, make_text_input


class Block(nn.Module):
    """A pre-norm residual MLP block: ``x + down(act(up(norm(x))))``."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.down = nn.Linear(hidden, width)

    def forward(self, x, scale=None):
        out = self.down(self.act(self.up(self.norm(x))))
        return x + (out if scale is None else scale * out)


class Stack(nn.Module):
    """Stem unit, ``n`` blocks in ``layers`` (with a shared extra argument), head unit."""

    def __init__(self, n: int = 4, width: int = 12, hidden: int = 24):
        super().__init__()
        self.stem = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, width))
        self.layers = nn.ModuleList(Block(width, hidden) for _ in range(n))
        self.parallel = nn.ModuleList(nn.Linear(width, width) for _ in range(2))  # not a chain
        self.head = nn.Sequential(nn.Linear(width, 20), nn.Tanh(), nn.Linear(20, 3))

    def forward(self, x):
        h = self.stem(x)
        scale = torch.full((1,), 0.5, device=x.device)
        for layer in self.layers:
            h = layer(h, scale=scale)
        h = h + sum(p(h) for p in self.parallel)
        return self.head(h)


def make_stack(n=4):
    torch.manual_seed(0)
    return Stack(n).eval()


X = torch.randn(160, 6, generator=torch.Generator().manual_seed(1))


def fit(model, X, **params):
    return NetworkCompressor(model, batch_size=40, **params).fit(X)


def fit_interrupted(monkeypatch, model, at: int = 2, **params) -> None:
    """A block-wise fit of ``model`` on ``X`` stopped (KeyboardInterrupt) at block ``at``."""
    real_turn = _blocks.Runner.turn

    def failing_turn(self, i):
        if i == at:
            raise KeyboardInterrupt
        real_turn(self, i)

    monkeypatch.setattr(_blocks.Runner, "turn", failing_turn)
    with pytest.raises(KeyboardInterrupt):
        fit(model, X, **params)
    monkeypatch.setattr(_blocks.Runner, "turn", real_turn)


def assert_same_models(a, b, atol=1e-6):
    assert [r["width_after"] for r in a.layers_] == [r["width_after"] for r in b.layers_]
    sa, sb = a.compressed_model_.state_dict(), b.compressed_model_.state_dict()
    assert sa.keys() == sb.keys()
    for name, tensor in sa.items():
        torch.testing.assert_close(tensor, sb[name], atol=atol, rtol=1e-5, msg=name)


def test_finds_the_chain_not_the_parallel_list():
    nc = fit(make_stack(), X, rank=0.5)
    assert nc.blocks_ == "layers"
    assert {r["producer"] for r in nc.layers_} == {
        "stem.0", "head.0", *(f"layers.{i}.up" for i in range(4))
    }


def test_finds_the_encoder_layers_of_a_bert_layout():
    model = make_bert_layer(n_layers=3)
    data = make_text_input(n=24, length=6)
    nc = NetworkCompressor(model, rank=0.5, batch_size=8).fit(data)
    assert nc.blocks_ == "encoder.layer"
    one_pass = NetworkCompressor(model, rank=0.5, batch_size=8, blocks=None).fit(data)
    assert one_pass.blocks_ is None
    assert_same_models(nc, one_pass)


@pytest.mark.parametrize(
    "params",
    [{"tol": 0.05}, {"rank": 0.4}, {"target_flops": 0.5}, {"tol": 0.05, "method": "qr"}],
    ids=["tol", "rank", "target_flops", "qr"],
)
@pytest.mark.parametrize("calibration", ["original", "sequential", "corrective"])
def test_blockwise_equals_one_pass(params, calibration):
    model = make_stack()
    blockwise = fit(model, X, calibration=calibration, **params)
    one_pass = fit(model, X, calibration=calibration, blocks=None, **params)
    assert blockwise.blocks_ == "layers" and one_pass.blocks_ is None
    assert blockwise.n_calibration_samples_ == one_pass.n_calibration_samples_ == 160
    assert_same_models(blockwise, one_pass)
    assert blockwise.layers_ != [] and any(
        r["width_after"] < r["width_before"] for r in blockwise.layers_
    )


def test_a_named_list_and_none():
    model = make_stack()
    assert fit(model, X, rank=0.5, blocks="layers").blocks_ == "layers"
    assert fit(model, X, rank=0.5, blocks=None).blocks_ is None
    assert fit(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2)), X).blocks_ is None


def test_bad_block_names_are_explained():
    model = make_stack()
    with pytest.raises(ValueError, match="does not exist; did you mean 'layers'"):
        fit(model, X, blocks="layer")
    with pytest.raises(ValueError, match="not an nn.ModuleList"):
        fit(model, X, blocks="head")
    with pytest.raises(ValueError, match="does not run on member 0's output"):
        fit(model, X, blocks="parallel")


def test_only_one_block_is_moved_in_at_a_time(monkeypatch):
    """With ``device`` given, moves alternate in/out of the same member, and only the member
    moved in runs (the blocks share no pass, small as their statistics are)."""
    moves, ran = [], []
    real_move, real_init = _blocks._move, _blocks.Runner.__init__

    def recording_move(module, device):
        moves.append(id(module))
        real_move(module, device)

    def check(module, args):
        if len(moves) == 8:
            return  # calibration is over: the compressed model runs (FLOP count)
        assert len(moves) % 2 == 1 and moves[-1] == id(module), "ran without being moved in"
        ran.append(id(module))

    def runner_init(self, *args):
        real_init(self, *args)
        for member in self.members:  # its norm runs only when the block runs (not replayed)
            member.norm.register_forward_pre_hook(
                lambda norm, args, member=member: check(member, args))

    monkeypatch.setattr(_blocks, "_move", recording_move)
    monkeypatch.setattr(_blocks.Runner, "__init__", runner_init)
    fit(make_stack(), X, rank=0.5, device="cpu")
    assert moves[::2] == moves[1::2], "a block was moved in while another was still in"
    assert len(set(moves)) == 4 and len(moves) == 8  # each of the 4 blocks once
    assert set(ran) == set(moves)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cpu_model_is_calibrated_one_block_at_a_time_on_cuda(monkeypatch):
    runners, real_init = [], _blocks.Runner.__init__

    def on_cuda(module):
        return next(module.parameters()).is_cuda

    def check(module, args):
        runner = runners[-1]
        if not runner.active:
            return  # calibration is over: the compressed model runs (FLOP count)
        assert on_cuda(module) and sum(on_cuda(m) for m in runner.members) == 1

    def runner_init(self, *args):
        real_init(self, *args)
        runners.append(self)
        for member in self.members:  # its norm runs only when the block runs (not replayed)
            member.norm.register_forward_pre_hook(
                lambda norm, args, member=member: check(member, args))

    monkeypatch.setattr(_blocks.Runner, "__init__", runner_init)
    model = make_stack()
    nc = NetworkCompressor(model, rank=0.5, batch_size=40, device="cuda").fit(X)
    reference = fit(model, X, rank=0.5, blocks=None)
    assert runners and next(nc.compressed_model_.parameters()).device.type == "cpu"
    assert [r["width_after"] for r in nc.layers_] == [r["width_after"] for r in reference.layers_]
    with torch.no_grad():
        torch.testing.assert_close(nc.compressed_model_(X), reference.compressed_model_(X),
                                   atol=1e-4, rtol=1e-4)


def test_memory_resumes_an_interrupted_run(tmp_path, monkeypatch):
    model = make_stack()
    fresh = fit(model, X, calibration="sequential", rank=0.5, blocks="layers")
    total = fresh.n_calibration_passes_

    fit_interrupted(monkeypatch, model, calibration="sequential", rank=0.5, memory=tmp_path)
    before = calibration_passes()
    resumed = fit(model, X, calibration="sequential", rank=0.5, memory=tmp_path)
    assert 0 < calibration_passes() - before < total  # blocks 0 and 1 came from the cache
    assert_same_models(resumed, fresh)


def tiny_text(n=8, length=10, vocab=64):
    gen = torch.Generator().manual_seed(2)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[-1, length // 2 :] = 0  # padding left out of the statistics, block-wise too
    return {"input_ids": torch.randint(0, vocab, (n, length), generator=gen),
            "attention_mask": mask}


@pytest.mark.slow
def test_finds_the_decoder_layers_of_hf_llama():
    transformers = pytest.importorskip("transformers")
    from skid.nn._batches import example_inputs

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    example = example_inputs(tiny_text(), torch.device("cpu"), torch.float32)
    layout = _blocks.find_blocks(model, example, "auto", [])
    assert (layout.name, layout.size) == ("model.layers", 3)


@pytest.mark.slow
def test_hf_bert_blockwise_equals_one_pass():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=2, max_position_embeddings=32,
    )
    model = transformers.BertForSequenceClassification(config).eval()
    data = tiny_text()
    blockwise = NetworkCompressor(model, rank=0.5, batch_size=4).fit(data)
    one_pass = NetworkCompressor(model, rank=0.5, batch_size=4, blocks=None).fit(data)
    assert blockwise.blocks_ == "bert.encoder.layer"
    kinds = [row["kind"] for row in blockwise.layers_]
    # three feed-forward widths and the pooler; three attention blocks' heads
    assert kinds.count("channels") == 4 and kinds.count("heads") == 3
    assert_same_models(blockwise, one_pass)


def test_memory_serves_a_refit_with_another_tol(tmp_path):
    model = make_stack()
    first = fit(model, X, tol=0.05, memory=tmp_path)
    again = fit(model, X, tol=0.1, memory=tmp_path)
    assert first.blocks_ == again.blocks_ == "layers"
    assert first.n_calibration_passes_ > 0 and again.n_calibration_passes_ == 0
    assert_same_models(again, fit(model, X, tol=0.1, blocks=None))


def test_the_plan_drops_each_interpolation_matrix_once_folded(monkeypatch):
    """Only one block's k × m matrices exist at a time: the plan keeps widths, not T's."""
    from skid.nn import _compressor

    plans, real = [], _compressor.blockwise_plan

    def spy(*args, **kwargs):
        plans.append(real(*args, **kwargs))
        return plans[-1]

    monkeypatch.setattr(_compressor, "blockwise_plan", spy)
    sequential = {"rank": 0.5, "calibration": "sequential"}
    for params in ({"rank": 0.5}, {"target_flops": 0.5}, sequential):
        nc = fit(make_stack(), X, **params)
        assert len(nc.layers_) == 6
    assert len(plans) == 3
    for plan in plans:
        assert all(s.interpolation.shape == (0, s.unit.width) for s in plan)
        # not views of the dropped T's: nothing of them stays allocated
        assert all(s.interpolation.untyped_storage().nbytes() == 0 for s in plan)


def test_block_outputs_are_recorded_in_the_statistics_pass(monkeypatch, tmp_path):
    """Original mode: each block runs once per batch (statistics and its outputs together);
    only statistics read back from memory= need a pass that records the outputs."""
    calls = []
    record = _blocks.Runner.record
    monkeypatch.setattr(_blocks.Runner, "record",
                        lambda self, *a, **k: calls.append(a[0]) or record(self, *a, **k))
    model = make_stack()
    fresh = fit(model, X, rank=0.5, memory=tmp_path)
    assert fresh.blocks_ == "layers" and calls == []
    assert_same_models(fresh, fit(model, X, rank=0.5, blocks=None))
    again = fit(model, X, rank=0.5, memory=tmp_path)
    assert again.n_calibration_passes_ == 0 and calls  # from the cache: recorded on their own
    assert_same_models(again, fresh)


@pytest.mark.parametrize("shared", [0, 2], ids=["a block a pass", "two blocks a pass"])
@pytest.mark.parametrize("calibration", ["original", "sequential", "corrective"])
def test_target_flops_holds_one_blocks_statistics_at_a_time(monkeypatch, calibration, shared):
    """The FLOP budget needs every unit's error curve, not its factorization: when a unit's
    statistics are factorized, no factorization of an earlier pass is still alive (with a
    statistics budget of two blocks a pass, the pass's other block's at most)."""
    import gc
    import weakref

    from skid.nn import _blockwise, _calibration

    # each block's one unit: a 24-wide statistic
    monkeypatch.setattr(_blockwise, "SHARED_PASS_BYTES", shared * 8 * 24**2)

    alive, most = weakref.WeakSet(), []
    real = _calibration._factorize

    def factorize(unit, accumulators, *held):
        gc.collect()
        most.append(len(alive))
        fac = real(unit, accumulators, *held)
        alive.add(fac)
        return fac

    monkeypatch.setattr(_calibration, "_factorize", factorize)
    model = make_stack(8)
    nc = fit(model, X, target_flops=0.5, calibration=calibration)
    assert nc.blocks_ == "layers" and len(most) >= 10
    assert max(most) == max(shared - 1, 0), most
    monkeypatch.setattr(_calibration, "_factorize", real)
    assert_same_models(nc, fit(model, X, target_flops=0.5, calibration=calibration,
                               blocks=None))


@pytest.mark.parametrize("calibration", ["original", "sequential", "corrective"])
def test_target_flops_candidates_are_compared_as_one_pass_compares_them(monkeypatch,
                                                                      calibration):
    """Block-wise, every candidate allocation is built side by side and the one a one-pass
    fit would keep is kept, whichever it is (here: the last one tried)."""
    import itertools

    import numpy as np

    from skid.nn import _planner, _sensitivity

    seen, real = [], _planner.Planner.flops_candidates

    def candidates(self, *args, **kwargs):
        found = real(self, *args, **kwargs)
        if not kwargs.get("plain"):  # not the uniform cut the output weights are measured at
            seen.append(found)
        return found

    later_is_closer = itertools.count(0, -1)
    monkeypatch.setattr(_planner.Planner, "flops_candidates", candidates)
    monkeypatch.setattr(_sensitivity, "output_gap", lambda *a: (next(later_is_closer),) * 2)
    model = make_stack()
    blockwise = fit(model, X, target_flops=0.45, calibration=calibration)
    assert blockwise.blocks_ == "layers" and len(seen[0]) > 1  # the side-by-side walk ran
    chosen = [r["width_after"] for r in blockwise.layers_]
    assert np.array_equal(chosen, seen[0][-1]) and not np.array_equal(chosen, seen[0][0])
    later_is_closer = itertools.count(0, -1)
    one_pass = fit(model, X, target_flops=0.45, calibration=calibration, blocks=None)
    assert_same_models(blockwise, one_pass)


@pytest.mark.parametrize("calibration", ["original", "sequential", "corrective"])
def test_memory_keeps_block_outputs_on_disk_and_resumes_without_rerunning(
        tmp_path, monkeypatch, calibration):
    """With memory=, block outputs are files (the host holds none), and a run interrupted at
    block 2 resumes without running blocks 0 and 1 again (nor, corrective, their originals)."""
    model = make_stack()
    fresh = fit(model, X, calibration=calibration, rank=0.5)
    real_turn, real_init = _blocks.Runner.turn, _blocks.Runner.__init__
    tapes, ran = [], []

    def failing_turn(self, i):
        if i == 2:
            raise KeyboardInterrupt
        real_turn(self, i)

    def runner_init(self, *args):
        real_init(self, *args)
        tapes.append(self.tape)
        for b, member in enumerate(self.members):  # member.up runs only when not replayed
            member.up.register_forward_pre_hook(lambda module, args, b=b: ran.append(b))

    monkeypatch.setattr(_blocks.Runner, "__init__", runner_init)
    monkeypatch.setattr(_blocks.Runner, "turn", failing_turn)
    with pytest.raises(KeyboardInterrupt):
        fit(model, X, calibration=calibration, rank=0.5, memory=tmp_path)
    stored = list((tmp_path / "joblib" / "skid_block_outputs").iterdir())
    tapes_per_block = 2 if calibration == "corrective" else 1  # and the original's outputs
    assert len(stored) == 2 * tapes_per_block
    assert all(len(list(d.glob("*.tape"))) == 4 for d in stored)  # 4 batches (and an index)
    monkeypatch.setattr(_blocks.Runner, "turn", real_turn)
    ran.clear()
    resumed = fit(model, X, calibration=calibration, rank=0.5, memory=tmp_path)
    assert all(isinstance(entry, _tapes.TapeFile) for entry in tapes[-1].outputs)
    calibrating = ran[: ran.index(3) + 1]  # the compressed model runs afterwards (FLOPs)
    assert set(calibrating) == {2, 3}, calibrating
    assert_same_models(resumed, fresh)
    __import__("joblib").Memory(tmp_path, verbose=0).clear(warn=False)
    assert not (tmp_path / "joblib" / "skid_block_outputs").exists()  # cleared with the rest


def test_an_incomplete_recording_leaves_no_tape(tmp_path):
    store = _blocks.TapeStore(__import__("joblib").Memory(str(tmp_path), verbose=0))
    recorder = _blocks.Recorder(store.folder("k"))
    recorder.append(torch.ones(2))
    assert recorder.finish(n_batches=2) is None
    assert store.load("k", 2) is None and not (tmp_path / "joblib" / "skid_block_outputs" /
                                                "k").exists()
    recorder = _blocks.Recorder(store.folder("k"))
    for value in (torch.ones(2), (torch.zeros(1), {"a": torch.ones(3)})):
        recorder.append(value)
    files = recorder.finish(n_batches=2)
    assert [f.path for f in store.load("k", 2)] == [f.path for f in files]
    tape = _blocks.Tape(files)
    tape.position = 1
    out = tape.current(torch.device("cpu"))
    assert torch.equal(out[1]["a"], torch.ones(3))


def test_a_sharing_copy_costs_only_what_is_folded_into_it():
    from skid.nn._graph import find_units
    from skid.nn._planner import apply as _apply
    from skid.nn._planner import select as _selection
    from skid.nn._surgery import sharing_copy

    model = make_stack()
    model.layers[3].norm.weight = model.layers[2].norm.weight  # a tie
    before = {k: v.clone() for k, v in model.state_dict().items()}
    twin = sharing_copy(model)
    pairs = list(zip(model.parameters(), twin.parameters(), strict=True))
    assert all(a is not b and a.data_ptr() == b.data_ptr() for a, b in pairs)
    assert twin.layers[3].norm.weight is twin.layers[2].norm.weight
    unit = next(u for u in find_units(model, (X[:4],), {})[0] if u.producer == "layers.1.up")
    stats = GramAccumulator().update(torch.randn(64, 24))
    _apply(twin, _selection(unit, stats.factorize(), 10))
    twin.layers[2].up.weight.data = torch.zeros(24, 12)  # what Module.to does to a parameter
    assert twin.layers[1].up.out_features == 10 and model.layers[1].up.out_features == 24
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name  # the model's tensors are untouched
    assert twin.layers[0].up.weight.data_ptr() == model.layers[0].up.weight.data_ptr()


def passes_of(**params) -> tuple:
    """The calibration passes of a fit of the 4-block stack on X (4 batches), and the fit."""
    before = calibration_passes()
    nc = fit(make_stack(), X, **params)
    return calibration_passes() - before, nc


def test_blocks_share_a_pass_while_their_statistics_are_small(monkeypatch):
    """``"original"`` without ``device``/``memory``: consecutive blocks whose statistics stay
    under the budget run in one pass (here all four: the stem's units, the blocks', the
    head's — three passes of 4 batches instead of six), with the same result as a block a
    pass and as one pass over the model."""
    from skid.nn import _blockwise

    shared, nc = passes_of(rank=0.5)
    assert nc.blocks_ == "layers" and shared == 3 * 4
    monkeypatch.setattr(_blockwise, "SHARED_PASS_BYTES", 0)
    alone, per_block = passes_of(rank=0.5)
    assert alone == 6 * 4
    assert_same_models(nc, per_block, atol=0)
    assert_same_models(nc, fit(make_stack(), X, rank=0.5, blocks=None), atol=0)


@pytest.mark.parametrize("params", [{"calibration": "sequential"}, {"device": "cpu"}],
                         ids=["sequential", "device"])
def test_blocks_keep_a_pass_each_where_the_walk_needs_it(params):
    """A calibration that follows the compression, and ``device=`` (one block moved in at a
    time), walk a block a pass whatever the budget."""
    count, _ = passes_of(rank=0.5, **params)
    shared, _ = passes_of(rank=0.5)
    assert count > shared
    if "device" in params:
        assert count == 6 * 4


def test_memory_keeps_a_pass_per_block(tmp_path):
    """With ``memory=`` each block's statistics and tape are stored under its own key, so a
    run that stops resumes at its block: blocks share no pass."""
    count, _ = passes_of(rank=0.5, memory=tmp_path)
    assert count == 6 * 4


def test_shared_passes_group_consecutive_blocks_up_to_the_budget(monkeypatch):
    """Groups grow while the Grams (8 m² bytes a reading) stay within the budget; a block
    over it alone is a pass of its own."""
    from types import SimpleNamespace

    from skid.nn import _blockwise

    widths = {0: 10, 1: 10, 2: 30, 3: 10, 4: 10, 5: 10}
    monkeypatch.setattr(_blockwise, "statistic_width", lambda unit: widths[unit])
    monkeypatch.setattr(_blockwise, "reading_consumers", lambda unit: [None])
    layout = SimpleNamespace(inside=((0,), (1,), (2,), (3, 4), (), (5,)))
    monkeypatch.setattr(_blockwise, "SHARED_PASS_BYTES", 8 * 250)
    assert _blockwise.shared_passes(layout, list(range(6))) == [(0, 1), (2,), (3, 4), (5,)]
    monkeypatch.setattr(_blockwise, "SHARED_PASS_BYTES", 8 * 300)
    assert _blockwise.shared_passes(layout, list(range(6))) == [(0, 1), (2,), (3, 4, 5)]


def test_a_route_recheck_inside_a_shared_pass_reruns_the_group(monkeypatch):
    """A width whose error float32 products cannot resolve is recomputed on a finer route: in
    a shared pass that is a second pass of the group from its input tape, with the result
    of a block a pass and of one pass over the model."""
    from skid.nn import _blockwise

    torch.manual_seed(0)
    model = Stack(3).eval()
    with torch.no_grad():  # every block's hidden activations: rank 3 plus a floor at 1e-5
        for layer in model.layers:
            layer.act = nn.Identity()
            layer.up.weight.copy_(torch.randn(24, 3) @ torch.randn(3, 12)
                                  + 1e-5 * torch.randn(24, 12))
            layer.up.bias.zero_()
    before = calibration_passes()
    shared = fit(model, X, rank=0.25)
    passes = calibration_passes() - before
    inside = [r for r in shared.layers_ if r["consumer"].startswith("layers.")]
    assert len(inside) == 3 and all(0 < r["error"] < 1e-3 for r in inside)
    assert passes > 3 * 4  # the re-check's passes on top of the stem's, blocks' and head's
    assert_same_models(shared, fit(model, X, rank=0.25, blocks=None), atol=0)
    monkeypatch.setattr(_blockwise, "SHARED_PASS_BYTES", 0)
    assert_same_models(shared, fit(model, X, rank=0.25), atol=0)
