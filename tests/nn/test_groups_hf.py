"""Channel groups in Hugging Face ``transformers`` models built from tiny configs (CPU only)."""

import io

import numpy as np
import pytest
import torch

from skid.nn import NetworkCompressor
from skid.nn._graph import find_units

pytest.importorskip("transformers")

from .hf_models import HF_MODELS, INNER  # noqa: E402

_NAMES = ("llama", "qwen2", "mistral", "t5_gated", "gpt2", "vit", "bert")
_llama, _qwen2, _mistral, _t5, _gpt2, _vit, _bert = (HF_MODELS[name][0] for name in _NAMES)
_text, _pixels = HF_MODELS["llama"][1], HF_MODELS["vit"][1]

def _layers(pattern):
    return [pattern.format(i) for i in range(2)]


_GATED = "model.layers.{}.mlp."
_MODELS = {
    # name: (factory, make_input, expected groups (producers, consumers), skipped reasons)
    "llama": (_llama, _text, [
        ((_GATED + "gate_proj", _GATED + "up_proj"), (_GATED + "down_proj",))],
        {"model.layers.0.self_attn.q_proj": "attention heads",
         "model.layers.0.self_attn.k_proj": "attention heads",
         "model.layers.0.mlp.down_proj": "residual", "lm_head": "model output"}),
    "qwen2": (_qwen2, _text, [
        ((_GATED + "gate_proj", _GATED + "up_proj"), (_GATED + "down_proj",))],
        {"model.layers.1.self_attn.v_proj": "attention heads",
         "model.layers.1.self_attn.o_proj": "residual"}),
    "mistral": (_mistral, _text, [
        ((_GATED + "gate_proj", _GATED + "up_proj"), (_GATED + "down_proj",))],
        {"model.layers.0.self_attn.q_proj": "attention heads"}),
    "t5_gated": (_t5, _text, [
        (("encoder.block.{}.layer.1.DenseReluDense.wi_0",
          "encoder.block.{}.layer.1.DenseReluDense.wi_1"),
         ("encoder.block.{}.layer.1.DenseReluDense.wo",))],
        {"encoder.block.0.layer.0.SelfAttention.q": "attention heads",
         "encoder.block.0.layer.1.DenseReluDense.wo": "residual"}),
    "gpt2": (_gpt2, _text, [
        (("transformer.h.{}.mlp.c_fc",), ("transformer.h.{}.mlp.c_proj",))],
        {"transformer.h.0.attn.c_attn": "`split`", "transformer.h.0.mlp.c_proj": "residual",
         "lm_head": "model output"}),
    "vit": (_vit, _pixels, [
        (("layers.{}.mlp.fc1",), ("layers.{}.mlp.fc2",))],
        {"embeddings.patch_embeddings.projection": "concatenated",
         "layers.0.attention.q_proj": "attention heads", "pooler.dense": "model output"}),
    "bert": (_bert, _text, [
        (("encoder.layer.{}.intermediate.dense",), ("encoder.layer.{}.output.dense",))],
        {"encoder.layer.0.attention.self.query": "attention heads",
         "encoder.layer.0.output.dense": "residual"}),
}


def _model(name):
    torch.manual_seed(0)
    return _MODELS[name][0]().eval()


def _call(batch):
    return ((batch,), {}) if isinstance(batch, torch.Tensor) else ((), batch)


def _expected(name):
    return [(tuple(p.format(i) for p in producers), tuple(c.format(i) for c in consumers))
            for i in range(2) for producers, consumers in _MODELS[name][2]]


@pytest.mark.parametrize("name", sorted(_MODELS))
def test_groups_found(name):
    units, skipped = find_units(_model(name), *_call(_MODELS[name][1]()))
    assert [(u.producers, tuple(c.name for c in u.consumers)) for u in units] == _expected(name)
    reasons = {s.producer: s.reason for s in skipped}
    for producer, reason in _MODELS[name][3].items():
        assert reason in reasons[producer], reasons[producer]


@pytest.mark.parametrize("name", sorted(_MODELS))
@pytest.mark.parametrize("options", [{"rank": 1.0}, {"tol": 0.0}])
def test_full_rank_reproduces(name, options):
    make_input = _MODELS[name][1]
    nc = NetworkCompressor(_model(name), batch_size=16, **options).fit(make_input(32, seed=1))
    held_out = make_input(8, seed=2)
    ours, original = nc.transform(held_out), nc._original_outputs(held_out)
    assert np.abs(ours - original).max() <= 1e-5 * np.abs(original).max()


@pytest.mark.parametrize("name", sorted(_MODELS))
def test_half_width_result_saves_and_runs(name):
    make_input = _MODELS[name][1]
    nc = NetworkCompressor(_model(name), rank=0.5).fit(make_input(16, seed=1))
    assert all(row["width_after"] == INNER // 2 for row in nc.layers_ if row["width_before"] ==
               INNER)
    assert nc.flops_["after"] < nc.flops_["before"]
    buffer = io.BytesIO()
    torch.save(nc.compressed_model_, buffer)
    buffer.seek(0)
    reloaded = torch.load(buffer, weights_only=False)
    inputs = _export_inputs(name)
    with torch.no_grad():
        torch.testing.assert_close(_first(reloaded(**inputs)),
                                   _first(nc.compressed_model_(**inputs)))


def _export_inputs(name):
    batch = _MODELS[name][1](2, seed=3)
    if isinstance(batch, torch.Tensor):
        return {"pixel_values": batch}
    inputs = {"input_ids": batch["input_ids"]}
    if name in ("llama", "qwen2", "mistral", "gpt2"):
        inputs["use_cache"] = False
    return inputs


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(_MODELS))
def test_half_width_result_exports(name):
    nc = NetworkCompressor(_model(name), rank=0.5).fit(_MODELS[name][1](16, seed=1))
    inputs = _export_inputs(name)
    exported = torch.export.export(nc.compressed_model_, (), inputs)
    with torch.no_grad():
        ours = exported.module()(**inputs)
        eager = nc.compressed_model_(**inputs)
    torch.testing.assert_close(_first(ours), _first(eager))


def _first(output):
    """The first tensor of a model output (a tuple, or a ModelOutput)."""
    return output[0] if isinstance(output, (tuple, list)) else next(iter(output.values()))
