"""Block-wise calibration gives the one-pass answer, or falls back to one pass and says why.

Finished blocks are replayed (their recorded outputs handed back): the block stays in place
with its forward replaced, so a forward that reads its blocks runs unchanged, and a model
whose forward reads block outputs other than through the next block is calibrated in one pass.
"""

import warnings
from typing import NamedTuple

import pytest
import torch
from torch import nn

from skid import NetworkCompressor

from .test_blocks import Block, assert_same_models

X = torch.randn(96, 6, generator=torch.Generator().manual_seed(3))
MODES = ["original", "sequential", "corrective"]


class Chain(nn.Module):
    """Stem, ``n`` blocks in ``layers``, head; ``combine`` reads the blocks' states."""

    def __init__(self, n=3, width=12, hidden=24, head_in=12):
        super().__init__()
        self.stem = nn.Linear(6, width)
        self.layers = nn.ModuleList(Block(width, hidden) for _ in range(n))
        self.head = nn.Sequential(nn.Linear(head_in, 20), nn.Tanh(), nn.Linear(20, 3))

    def run_layers(self, h):
        states = []
        for layer in self.layers:
            h = layer(h)
            states.append(h)
        return states

    def forward(self, x):
        return self.head(self.run_layers(self.stem(x))[-1])


class LastTwoStates(Chain):
    """The head reads the last two blocks' outputs (as a classifier over the last two CLS
    states does): block 1's output is used outside the chain."""

    def __init__(self):
        super().__init__(head_in=24)

    def forward(self, x):
        return self.head(torch.cat(self.run_layers(self.stem(x))[-2:], -1))


class ReadsAttribute(Chain):
    """The forward reads an attribute of its first block (as nn.TransformerEncoder does)."""

    def __init__(self):
        super().__init__()
        self.layers[0].some_attribute = 0.5

    def forward(self, x):
        scale = self.layers[0].some_attribute * self.layers[0].up.weight.new_ones(())
        return self.head(scale * self.run_layers(self.stem(x))[-1])


def seeded(cls, *args):
    torch.manual_seed(0)
    return cls(*args).eval()


def fit(model, X, **params):
    return NetworkCompressor(model, rank=0.5, batch_size=32, **params).fit(X)


def fit_quietly(model, X, **params):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning
        return fit(model, X, **params)


@pytest.mark.parametrize("calibration", MODES)
def test_a_head_over_several_blocks_falls_back_to_the_one_pass_answer(calibration):
    model = seeded(LastTwoStates)
    with pytest.warns(UserWarning, match=r"'layers' is not calibrated block by block.*'head.0'"):
        auto = fit(model, X, calibration=calibration)
    one_pass = fit(model, X, calibration=calibration, blocks=None)
    assert auto.blocks_ is None
    assert_same_models(auto, one_pass, atol=0)
    with pytest.raises(ValueError, match="blocks='layers' cannot be calibrated block by block"):
        fit(model, X, calibration=calibration, blocks="layers")


@pytest.mark.parametrize("calibration", MODES)
def test_a_forward_that_reads_its_blocks_attributes_runs_block_wise(calibration):
    model = seeded(ReadsAttribute)
    blockwise = fit_quietly(model, X, calibration=calibration)
    assert blockwise.blocks_ == "layers"
    assert_same_models(blockwise, fit(model, X, calibration=calibration, blocks=None))
    assert type(model.layers[0]) is Block and "forward" not in vars(model.layers[0])


def test_nn_transformer_encoder_runs_block_wise():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=64, nhead=4, dim_feedforward=128,
                                       batch_first=True)
    model = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False).eval()
    data = torch.randn(8, 16, 64, generator=torch.Generator().manual_seed(0))
    blockwise = NetworkCompressor(rank=0.5, batch_size=4).fit(model, data)
    one_pass = NetworkCompressor(rank=0.5, batch_size=4, blocks=None).fit(model, data)
    assert blockwise.blocks_ == "layers"
    assert any(r["width_after"] < r["width_before"] for r in blockwise.layers_)
    assert_same_models(blockwise, one_pass)
    with torch.no_grad():
        torch.testing.assert_close(blockwise.compressed_model_(data),
                                   one_pass.compressed_model_(data))


def test_a_hook_that_edits_a_blocks_output_falls_back():
    model = seeded(Chain)
    model.layers[0].register_forward_hook(lambda module, args, output: 2 * output)
    with pytest.warns(UserWarning, match="block 1's output changes"):
        auto = fit(model, X)
    assert auto.blocks_ is None
    assert_same_models(auto, fit(model, X, blocks=None), atol=0)


def test_a_hook_that_only_watches_keeps_block_wise_and_the_answer():
    model = seeded(Chain)
    seen = []
    model.layers[1].register_forward_hook(lambda module, args, output: seen.append(output))
    blockwise = fit_quietly(model, X)
    assert blockwise.blocks_ == "layers" and seen
    assert_same_models(blockwise, fit(model, X, blocks=None))
    assert len(model.layers[1]._forward_hooks) == 1  # the user's hook is still there


class Fussy(Chain):
    """A forward that cannot run on replayed blocks (it checks that each block changes its
    input): block-wise cannot run it, one pass can."""

    def forward(self, x):
        h = self.stem(x)
        for layer in self.layers:
            new = layer(h)
            if torch.equal(new, h):
                raise RuntimeError("a block returned its input unchanged")
            h = new
        return self.head(h)


def test_a_model_that_cannot_be_replayed_falls_back_naming_the_reason():
    model = seeded(Fussy)
    with pytest.warns(UserWarning, match="does not run with its finished blocks replayed "
                                         r"\(RuntimeError: a block returned its input"):
        auto = fit(model, X)
    assert auto.blocks_ is None
    assert_same_models(auto, fit(model, X, blocks=None), atol=0)


class Out(NamedTuple):
    hidden: torch.Tensor
    extra: torch.Tensor


class TupleBlock(Block):
    def forward(self, x):
        h = super().forward(x)
        return Out(h, h.sum(-1))


class TupleChain(Chain):
    """Blocks returning a NamedTuple, the next block reading its first field."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(TupleBlock(12, 24) for _ in range(3))

    def forward(self, x):
        h = self.stem(x)
        for layer in self.layers:
            h = layer(h).hidden
        return self.head(h)


@pytest.mark.parametrize("memory", [False, True], ids=["host", "memory"])
@pytest.mark.parametrize("calibration", MODES)
def test_named_tuple_block_outputs(tmp_path, memory, calibration):
    model = seeded(TupleChain)
    params = {"calibration": calibration, "memory": tmp_path if memory else None}
    blockwise = fit_quietly(model, X, **params)
    assert blockwise.blocks_ == "layers"
    assert_same_models(blockwise, fit(model, X, calibration=calibration, blocks=None))
    if memory:  # read back from the tapes
        assert_same_models(fit_quietly(model, X, **params), blockwise, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("flag", ["output_hidden_states", "output_attentions"])
def test_hf_bert_with_per_layer_outputs(flag):
    """Per-layer outputs the model returns (collected by hooks on the layers) are no unit's
    input: block-wise runs, with the one-pass answer."""
    transformers = pytest.importorskip("transformers")
    from .test_blocks import tiny_text

    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=2, max_position_embeddings=32, **{flag: True},
    )
    model = transformers.BertForSequenceClassification(config).eval()
    data = tiny_text()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="blocks=")
        blockwise = NetworkCompressor(model, rank=0.5, batch_size=4).fit(data)
    one_pass = NetworkCompressor(model, rank=0.5, batch_size=4, blocks=None).fit(data)
    assert blockwise.blocks_ == "bert.encoder.layer"
    assert_same_models(blockwise, one_pass)
    if flag == "output_hidden_states":
        with torch.no_grad():
            assert len(blockwise.compressed_model_(**data).hidden_states) == 4


def test_run_to_run_noise_of_the_model_itself_is_not_a_difference():
    """A model whose plain runs differ slightly (as nondeterministic GPU kernels make them)
    keeps block-wise when replay differs by no more than that; a head over several blocks'
    states still falls back."""
    from skid.nn import _blocks
    from skid.nn._graph import find_units

    def noisy(model):
        for layer in model.layers:  # each call adds noise of 1e-7: no two runs alike
            layer.register_forward_hook(lambda m, a, out: out + 1e-7 * torch.rand_like(out))
        return model

    example = ((X[:2],), {})
    model = noisy(seeded(Chain))
    assert _blocks.find_blocks(model, example, "auto", find_units(model, *example)[0])
    model = noisy(seeded(LastTwoStates))
    with pytest.warns(UserWarning, match="not calibrated block by block"):
        assert _blocks.find_blocks(model, example, "auto",
                                   find_units(model, *example)[0]) is None
