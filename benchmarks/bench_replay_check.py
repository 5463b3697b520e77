"""What the block-wise safety check costs: ``find_blocks`` (its replay check included) against
the whole ``NetworkCompressor.fit``, on a BERT encoder built from a small config (random
weights; the check runs on the first two samples only, so its cost does not grow with X).

For each depth: median seconds of ``find_blocks`` with the check and with the check replaced by
a no-op (the structural detection alone), and of the whole block-wise fit; the check's share of
the fit. One thread; other jobs may share the machine, so compare the ratios.

    python benchmarks/bench_replay_check.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import transformers

from skid import NetworkCompressor
from skid.nn import _blocks
from skid.nn._calibration import example_inputs


def bert(layers: int):
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=512, hidden_size=128, intermediate_size=512,
                                     num_hidden_layers=layers, num_attention_heads=4,
                                     max_position_embeddings=128)
    return transformers.BertModel(config).eval()


def median_seconds(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    rounds = parser.parse_args().rounds
    torch.set_num_threads(1)
    data = {"input_ids": torch.randint(0, 512, (256, 64), generator=torch.Generator()
                                       .manual_seed(0))}
    print("layers  find_blocks s  without check s  fit s  check / fit")
    for layers in (2, 4, 8):
        model = bert(layers)
        nc = NetworkCompressor(model, rank=0.5, batch_size=64)
        nc.fit(data)  # warm-up; also gives the units
        units = nc._selections and [s.unit for s in nc._selections]
        example = example_inputs({k: v[:64] for k, v in data.items()}, torch.device("cpu"),
                                 torch.float32)
        def detect(model=model, example=example, units=units):
            return _blocks.find_blocks(model, example, "auto", units)

        with_check = median_seconds(detect, rounds)
        real = _blocks._replay_check
        _blocks._replay_check = lambda *args: None
        try:
            without = median_seconds(detect, rounds)
        finally:
            _blocks._replay_check = real
        fit = median_seconds(lambda m=model: NetworkCompressor(m, rank=0.5, batch_size=64)
                             .fit(data), rounds)
        print(f"{layers:6d}  {with_check:13.3f}  {without:15.3f}  {fit:5.2f}  "
              f"{(with_check - without) / fit:10.1%}")


if __name__ == "__main__":
    main()
