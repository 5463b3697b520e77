"""A fit runs Hugging Face decoders without their key/value cache, selects what it selected
with the cache on, and gives the compressed model the setting back."""

import pytest
import torch

from skid.nn import NetworkCompressor, _hf_config

transformers = pytest.importorskip("transformers")

from .hf_attention import HF_ATTENTION  # noqa: E402
from .hf_models import HF_MODELS  # noqa: E402

# the suite's models whose configs have the cache on: decoders and encoder-decoders
_DECODERS = {**{name: HF_MODELS[name][:2] for name in ("llama", "qwen2", "mistral", "gpt2")},
             **{name: HF_ATTENTION[name][:2] for name in ("bart", "whisper")}}


def _model(name):
    torch.manual_seed(0)
    return _DECODERS[name][0]().eval()


def _watch_caches(model) -> list:
    """Pre-hooks on every module that note each call handed a cache object (a deep copy of the
    model, as fit's working copy, keeps them and notes into the same list)."""
    seen = []

    def hook(module, args, kwargs):
        if any(isinstance(v, transformers.cache_utils.Cache)
               for v in (*args, *kwargs.values())):
            seen.append(type(module).__name__)

    for module in model.modules():
        module.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


@pytest.mark.parametrize("name", sorted(_DECODERS))
def test_no_pass_of_a_fit_builds_a_cache_and_the_setting_comes_back(name):
    model, data = _model(name), _DECODERS[name][1]
    assert model.config.use_cache is True
    seen = _watch_caches(model)
    nc = NetworkCompressor(model, rank=0.5, prune=("channels", "heads")).fit(data(16, seed=1))
    assert seen == []
    assert model.config.use_cache is True and nc.compressed_model_.config.use_cache is True
    with torch.no_grad():  # the hooks do see a cache where one is built
        nc.compressed_model_(**data(2, seed=2))
    assert seen


@pytest.mark.parametrize("name", sorted(_DECODERS))
def test_a_fit_without_the_cache_selects_what_it_did_with_it(name, monkeypatch):
    data = _DECODERS[name][1](16, seed=1)
    fits = {}
    for cache in (False, True):
        if cache:
            monkeypatch.setattr(_hf_config, "switch_off_kv_cache", lambda model: [])
        fits[cache] = NetworkCompressor(_model(name), rank=0.5,
                                        prune=("channels", "heads")).fit(data)
    without, with_cache = fits[False], fits[True]
    assert without.flops_ == with_cache.flops_ and without.params_ == with_cache.params_
    for a, b in zip(without.layers_, with_cache.layers_, strict=True):
        assert a["producer"] == b["producer"] and a["width_after"] == b["width_after"]
        assert a["error"] == b["error"]
    kept, other = without.compressed_model_.state_dict(), with_cache.compressed_model_.state_dict()
    assert kept.keys() == other.keys()
    assert all(torch.equal(kept[k], other[k]) for k in kept)


def test_a_config_that_refuses_the_change_is_left_as_it_is():
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class Frozen:
        use_cache: bool = True

    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    model.config = Frozen()
    nc = NetworkCompressor(model, rank=0.5).fit(torch.randn(64, 8))
    assert nc.compressed_model_.config.use_cache is True
    assert _hf_config.switch_off_kv_cache(model) == []
