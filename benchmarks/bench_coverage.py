"""Coverage: the share of each test architecture's FLOPs that skid can prune, before and after
channel groups.

For every architecture of the test suite — the small CNNs and BERT of ``tests/nn/models.py``,
the hand-written blocks of ``tests/nn/blocks.py`` (ResNet-50 stem and bottleneck, ResNeXt,
MBConv with SE, DenseNet, Inception, fire, a SwiGLU block) and the tiny-config ``transformers``
models of ``tests/nn/hf_models.py`` — the FLOPs per sample of the layers that a prunable width
changes (producers, per-channel ops in between, consumers), as a share of the model's FLOPs.
"Before" is skid at ``--before`` (the commit before channel groups: one producer → one consumer
units), run in a subprocess with that commit's ``skid`` package; "after" is this checkout.

A second table lists, per architecture with attention, the attention blocks found, the blocks
whose heads ``NetworkCompressor(rank=0.5)`` pruned (fewer heads after the fit), and those
skipped with their reason; the architectures include the attention blocks of
``tests/nn/blocks.py`` (timm ViT/Swin/Swin-V2, torchvision ViT/Swin, ``nn.TransformerEncoder``)
and the ``transformers`` models of ``tests/nn/hf_attention.py`` (DistilBERT, BART, Marian,
Whisper, CLIP).

    python benchmarks/bench_coverage.py            # every architecture (a few minutes)
    python benchmarks/bench_coverage.py --quick    # three of them
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BEFORE = "83c7456"  # the last commit with one-producer/one-consumer units
QUICK = ("mlp", "mbconv_se", "hf_llama", "timm_vit")


def architectures() -> dict:
    """name -> (factory, make_input) for every test architecture available here."""
    from tests.nn import blocks
    from tests.nn.models import ARCHITECTURES

    found = dict(ARCHITECTURES)
    found.update({name: (lambda name=name: blocks.make_block(name), entry[1])
                  for name, entry in (*blocks.BLOCKS.items(),
                                      *getattr(blocks, "ATTENTION_BLOCKS", {}).items())})
    try:
        import transformers  # noqa: F401
    except ImportError:
        return found
    from tests.nn.hf_models import HF_MODELS

    for name, (factory, make_input) in HF_MODELS.items():
        found[f"hf_{name}"] = (factory, make_input)
    try:
        from tests.nn.hf_attention import HF_ATTENTION
    except ImportError:  # a checkout without it
        return found
    for name, (factory, make_input, _) in HF_ATTENTION.items():
        found[f"hf_{name}"] = (factory, make_input)
    return found


def measure_heads(names) -> list:
    """Per architecture with attention: [name, found, pruned at rank=0.5, skipped, reasons]."""
    import warnings

    import torch

    from skid.nn import NetworkCompressor
    from skid.nn._heads import attention_layout

    found = architectures()
    rows = []
    for name in names:
        factory, make_input = found[name]
        torch.manual_seed(0)
        model = factory().eval()
        blocks = [n for n, m in model.named_modules() if attention_layout(m) is not None]
        if not blocks:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # few calibration rows on these tiny inputs
                nc = NetworkCompressor(model, rank=0.5).fit(make_input(n=16))
        except Exception as exc:  # noqa: BLE001 - a refused model is a row of the table
            rows.append([name, len(blocks), 0, 0, f"REFUSED: {type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:120]}"])
            continue
        pruned = sum(r["kind"] == "heads" and r["width_after"] < r["width_before"]
                     for r in nc.layers_)
        reasons = sorted({s["reason"].removeprefix("attention heads: ")
                          for s in nc.skipped_ if s["producer"] in blocks})
        skipped = sum(s["producer"] in blocks for s in nc.skipped_)
        rows.append([name, len(blocks), pruned, skipped, "; ".join(reasons) or "-"])
    return rows


def measure(names) -> dict:
    """name -> [share of FLOPs in prunable widths, number of widths, FLOPs per sample]."""
    import torch

    from skid.nn._flops import count_flops
    from skid.nn._graph import find_units
    from tests.nn.models import call_args

    # nn.MultiheadAttention's fused kernels are not counted: the same (unfused) ops both sides
    torch.backends.mha.set_fastpath_enabled(False)
    found = architectures()
    results = {}
    for name in names:
        if name not in found:
            continue
        factory, make_input = found[name]
        torch.manual_seed(0)
        model = factory().eval()
        args, kwargs = call_args(make_input())
        units, _ = find_units(model, args, kwargs)
        total, per_module = count_flops(model, args, kwargs)
        touched = set()
        for unit in units:  # a channel group, or an old one-producer/one-consumer unit
            touched.update(unit.modules() if hasattr(unit, "modules")
                           else (unit.producer, unit.consumer, *unit.passthroughs))
        covered = sum(per_module.get(module, 0) for module in touched)
        results[name] = [covered / total, len(units), int(total)]
    return results


def measure_before(revision: str, names) -> dict:
    """:func:`measure` with the ``skid`` package of ``revision``, in a subprocess."""
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "archive", revision, "skid"], cwd=REPO, check=True,
                                 capture_output=True).stdout
        with tarfile.open(fileobj=__import__("io").BytesIO(archive)) as tar:
            tar.extractall(tmp, filter="data")
        done = subprocess.run(
            [sys.executable, __file__, "--worker", tmp, "--names", ",".join(names)],
            capture_output=True, text=True, check=True, cwd=REPO)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    parser.add_argument("--before", default=BEFORE, help="git revision of the 'before' skid")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--names", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.worker:  # the 'before' skid first on the path, this checkout's tests after it
        sys.path[:0] = [options.worker, str(REPO)]
        print(json.dumps(measure(options.names.split(","))))
        return
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _models import print_table, set_threads

    set_threads(1)
    names = list(QUICK) if options.quick else list(architectures())
    after = measure(names)
    before = measure_before(options.before, names)
    rows = []
    for name in after:
        share_before, n_before, _ = before.get(name, [0.0, 0, 0])
        share_after, n_after, total = after[name]
        rows.append([name, total, n_before, 100 * share_before, n_after, 100 * share_after])
    print_table(
        f"share of FLOPs in prunable widths: before ({options.before}: units) and after "
        "(channel groups)",
        ["architecture", "FLOPs/sample", "units before", "% before", "groups after",
         "% after"],
        rows, ["s", "d", "d", ".1f", "d", ".1f"])
    blocked = [r[0] for r in rows if r[2] == 0]
    print(f"\nNotPrunableError before: {', '.join(blocked) or 'none'}; after: "
          f"{', '.join(r[0] for r in rows if r[4] == 0) or 'none'}")
    heads = measure_heads(names)
    print_table(
        "attention blocks: found, pruned by NetworkCompressor(rank=0.5), skipped (reason)",
        ["architecture", "found", "pruned", "skipped", "reason skipped"], heads,
        ["s", "d", "d", "d", "s"])
    print(f"\nattention blocks: {sum(r[1] for r in heads)} found, {sum(r[2] for r in heads)} "
          f"pruned, {sum(r[3] for r in heads)} skipped, in {len(heads)} architectures")


if __name__ == "__main__":
    main()
