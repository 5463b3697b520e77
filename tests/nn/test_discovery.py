"""Finding the units: one pass on the example serves the channel trace, the heads' checks and
the forward order (and records what the block layout reads)."""

import pytest
import torch

from skid.nn import NetworkCompressor
from skid.nn._discovery import find_all_units
from skid.nn._head_discovery import find_heads, in_forward_order, release_heads
from skid.nn._residual_stages import find_channel_groups

from .blocks import ATTENTION_BLOCKS, BLOCKS, make_block
from .models import ARCHITECTURES, call_args


def _models():
    """``name -> (factory, make_input)``: the attention blocks, a few CNNs and BERT, and the
    Hugging Face models where ``transformers`` is installed."""
    found = {name: (lambda n=name: make_block(n), spec[1])
             for name, spec in ATTENTION_BLOCKS.items()}
    found.update({name: (lambda n=name: make_block(n), BLOCKS[name][1])
                  for name in ("gated_mlp", "mbconv_se", "inception")})
    found.update({name: ARCHITECTURES[name] for name in ("bert", "resnet_basic", "vgg")})
    try:
        import transformers  # noqa: F401
    except ImportError:
        return found
    from .hf_attention import HF_ATTENTION
    from .hf_models import HF_MODELS

    found.update({f"hf_{name}": (spec[0], spec[1])
                  for name, spec in {**HF_MODELS, **HF_ATTENTION}.items()})
    return found


_MODELS = _models()


def _settings(**params):
    return NetworkCompressor(**params)._check_params()


def _inputs(make):
    return call_args(make(2))


@pytest.mark.parametrize("layers", ["auto", "some"])
@pytest.mark.parametrize("name", sorted(_MODELS))
def test_units_in_the_order_of_their_own_pass(name, layers):
    """The units and skip records are those the finders give when the forward order is
    found by a pass of its own after them (as before the probing pass kept it)."""
    factory, make = _MODELS[name]
    torch.manual_seed(0)
    model = factory().eval()
    args, kwargs = _inputs(make)
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    chosen = "auto" if layers == "auto" else linear[::2]
    settings = _settings(layers=chosen)
    units, skipped = find_all_units(model, (args, kwargs), settings)

    torch.manual_seed(0)
    fresh = factory().eval()
    groups, skipped_groups = find_channel_groups(fresh, args, kwargs, layers=chosen)
    heads, skipped_heads = find_heads(fresh, args, kwargs)
    if chosen != "auto":
        dropped = [h for h in heads if h.attention not in chosen and h.producer not in chosen]
        release_heads(fresh, dropped)
        heads = [h for h in heads if h not in dropped]
    expected = in_forward_order(fresh, groups + heads, args, kwargs)
    assert [repr(u) for u in units] == [repr(u) for u in expected]
    assert [(s.producer, s.reason) for s in skipped] == [
        (s.producer, s.reason) for s in skipped_groups + skipped_heads]
    assert [type(m) for m in model.modules()] == [type(m) for m in fresh.modules()]


@pytest.mark.parametrize(("name", "passes"),
                         [("transformer_encoder", 2), ("timm_vit", 1), ("vgg", 1)])
def test_finding_channels_and_heads_runs_the_model_once(name, passes):
    """The channel trace's pass also probes every attention block with fewer heads and
    records the forward order; no pass checks on its own that the model runs. Blocks that take
    a pruning form (``nn.MultiheadAttention``) are probed in a pass of their own after the
    trace, which must see them as they are."""
    factory, make = _MODELS[name]
    model = factory().eval()
    calls = []
    model.register_forward_pre_hook(lambda module, inputs: calls.append(1))
    find_all_units(model, _inputs(make), _settings())
    assert len(calls) == passes


def test_a_finders_own_error_is_raised_after_a_plain_pass_runs(monkeypatch):
    """Where a finder fails on an input the model runs, a plain pass shows the input is not
    the cause and the finder's own error is raised, unchanged."""
    import skid.nn._discovery as discovery

    factory, make = _MODELS["vgg"]
    model = factory().eval()
    calls = []
    model.register_forward_pre_hook(lambda module, inputs: calls.append(1))

    def broken(*args, **kwargs):
        raise RuntimeError("the finder broke")

    monkeypatch.setattr(discovery, "find_channel_groups", broken)
    with pytest.raises(RuntimeError, match="the finder broke"):
        find_all_units(model, _inputs(make), _settings())
    assert len(calls) == 1  # the plain pass


def test_an_input_the_model_cannot_run_is_named_as_such():
    """The finders fail on an input of the wrong width; the error is the calibration data's,
    from the plain pass, not the trace's."""
    factory, make = _MODELS["vgg"]
    model = factory().eval()
    args, kwargs = _inputs(make)
    wrong = tuple(a[:, :1] if isinstance(a, torch.Tensor) else a for a in args)
    with pytest.raises(ValueError, match="could not run on the first samples of the "
                                         "calibration data") as info:
        find_all_units(model, (wrong, kwargs), _settings())
    assert "forward pass on the example input failed" not in str(info.value)


@pytest.mark.parametrize("name", sorted(_MODELS))
def test_the_finders_pass_gives_the_block_layout_its_own_pass_would(name):
    """The calls recorded during the finders' passes give the layout (units inside, before
    and after the blocks, the blocks' output types) that a pass of the layout's own gives."""
    import warnings

    from skid.nn._blocks import ExamplePass
    from skid.nn._discovery import block_layout

    factory, make = _MODELS[name]
    torch.manual_seed(0)
    model = factory().eval()
    example = _inputs(make)
    settings = _settings(prune=("channels", "heads"), blocks="auto")
    with ExamplePass(model, "auto") as recorded:
        units, _ = find_all_units(model, example, settings)
    calls = recorded.calls()
    with warnings.catch_warnings(record=True) as seen_recorded:
        warnings.simplefilter("always")
        from_finders = block_layout(model, example, settings, units, calls)
    with warnings.catch_warnings(record=True) as seen_own:
        warnings.simplefilter("always")
        own = block_layout(model, example, settings, units)
    assert from_finders == own
    assert (from_finders is None) or from_finders.types == own.types
    assert [str(w.message) for w in seen_recorded] == [str(w.message) for w in seen_own]
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 1]
    assert (calls is not None) == bool(lists)


def test_the_block_layout_reads_the_finders_pass_instead_of_its_own():
    """Given the finders' record, finding the blocks runs only the replay check's passes:
    one model call fewer than recording a pass of its own."""
    from skid.nn._blocks import ExamplePass
    from skid.nn._discovery import block_layout

    factory, make = _MODELS["bert"]
    model = factory().eval()
    example = _inputs(make)
    settings = _settings(blocks="auto")
    with ExamplePass(model, "auto") as recorded:
        units, _ = find_all_units(model, example, settings)
    calls = []
    handle = model.register_forward_pre_hook(lambda module, inputs: calls.append(1))
    assert block_layout(model, example, settings, units, recorded.calls()) is not None
    with_record = len(calls)
    calls.clear()
    assert block_layout(model, example, settings, units) is not None
    handle.remove()
    assert len(calls) == with_record + 1


def test_a_record_is_dropped_once_a_module_changes_class():
    """The finders give a pruned attention form its own class back after their passes; the
    record of a pass made with the other class is not used (the layout records its own)."""
    from skid.nn._blocks import ExamplePass

    factory, make = _MODELS["bert"]
    model = factory().eval()
    args, kwargs = _inputs(make)
    with ExamplePass(model, "auto") as recorded:
        with torch.no_grad():
            model(*args, **kwargs)
    assert recorded.calls() is not None
    some = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
    some.__class__ = type("OtherLinear", (torch.nn.Linear,), {})
    assert recorded.calls() is None


def test_a_record_keeps_the_last_complete_pass_and_skips_copies():
    """A pass that stops half-way leaves the last complete one in place; a module's copy run
    during a pass (it copies the module's hooks, as a probe's copy does) is not counted."""
    import copy

    from skid.nn._batches import StopForward
    from skid.nn._blocks import ExamplePass

    factory, make = _MODELS["bert"]
    model = factory().eval()
    args, kwargs = _inputs(make)
    layers = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 1]
    member = layers[0][0]
    with ExamplePass(model, "auto") as recorded, torch.no_grad():
        probed = []

        def run_a_copy(module, inputs, output):
            if not probed:  # the copy's own call runs this hook too
                probed.append(1)
                copy.deepcopy(module)(*inputs)

        probe = member.register_forward_hook(run_a_copy)
        model(*args, **kwargs)
        assert probed
        probe.remove()
        order, members = recorded.calls()
        assert len(members[id(member)]) == 1  # the copy's call is not the member's
        assert set(members) == {id(m) for module_list in layers for m in module_list}

        def stop(module, inputs, output):
            raise StopForward

        handle = member.register_forward_hook(stop)
        with pytest.raises(StopForward):
            model(*args, **kwargs)
        handle.remove()
    assert recorded.calls()[1] is members


def test_head_probes_without_a_pass_refuse_to_answer():
    """Every found block would read "never called on the data" if no pass ran while the
    probes were in place: an internal error, not a silent skip of every head."""
    from skid.nn._head_discovery import HeadProbes

    factory, make = _MODELS["timm_vit"]
    model = factory().eval()
    probes = HeadProbes(model)
    assert probes.found
    with probes:
        pass
    with pytest.raises(RuntimeError, match="no forward pass"):
        probes.result()
