"""A small LLaMA-shaped causal LM trained on CPython's own sources, for bench_fidelity.py.

Byte-level tokens (vocabulary 256) of the standard library's ``*.py`` files: every tenth file
(sorted by name) is held out, the rest is training text. ``transformers.LlamaForCausalLM``
with 2 layers, hidden size 96, a 256-wide SwiGLU MLP and grouped-query attention (6 heads of 16,
2 KV heads), trained with AdamW for a few hundred steps on one CPU thread. Everything is seeded.
"""

from __future__ import annotations

import functools
import math
import sysconfig
from pathlib import Path

import numpy as np
import torch
from _baselines import heads_sliced, magnitude_heads, sliced

from skid import NetworkCompressor

SEQ = 64
HIDDEN, INNER, LAYERS = 96, 256, 2
HEADS, KV_HEADS, HEAD_DIM = 6, 2, 16


def stdlib_tokens(max_bytes: int = 3_000_000) -> tuple[torch.Tensor, torch.Tensor]:
    """(training, held-out) byte tokens of the standard library's sources."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    train, held_out = bytearray(), bytearray()
    for i, path in enumerate(files):
        target = held_out if i % 10 == 9 else train
        if len(target) < max_bytes:
            target += path.read_bytes()
    as_tensor = lambda b: torch.frombuffer(b, dtype=torch.uint8).long()  # noqa: E731
    return as_tensor(train), as_tensor(held_out)


def windows(tokens: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """``n`` random windows of SEQ + 1 tokens (the last one is only a target)."""
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(tokens) - SEQ - 1, (n,), generator=gen)
    return torch.stack([tokens[s:s + SEQ + 1] for s in starts.tolist()])


def make_llama(seed: int = 0):
    """The untrained model."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=HIDDEN, intermediate_size=INNER, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
        max_position_embeddings=SEQ, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config)


def train_llama(train: torch.Tensor, steps: int, seed: int = 0):
    """The trained model (eval mode)."""
    model = make_llama(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 3e-3, total_steps=steps)
    model.train()
    for step in range(steps):
        batch = windows(train, 32, seed=10_000 + step)
        loss = model(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval()


@functools.lru_cache(maxsize=1)
def trained(steps: int, cache=None):
    """``(model, train tokens, held-out tokens)``, trained once per run for every table;
    with ``cache`` (a file path) the trained weights are read from it, or saved to it."""
    train, held_out = stdlib_tokens()
    if cache is not None and Path(cache).is_file():
        model = make_llama()
        model.load_state_dict(torch.load(cache, weights_only=True))
        return model.eval(), train, held_out
    model = train_llama(train, steps)
    if cache is not None:
        torch.save(model.state_dict(), cache)
    return model, train, held_out


def perplexity(model, data: torch.Tensor) -> float:
    """exp(mean next-token cross-entropy) over windows of SEQ + 1 tokens."""
    losses = []
    with torch.no_grad():
        for batch in data.split(64):
            logits = model(input_ids=batch[:, :-1], use_cache=False).logits
            losses.append(torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                reduction="sum"))
    return math.exp(float(sum(losses)) / data[:, 1:].numel())


def magnitude_channels(model, unit, k: int) -> np.ndarray:
    """The ``k`` channels of a group with the largest squared L2 norm of all their weights
    (gate and up rows, down column): Torch-Pruning's magnitude importance for a group."""
    modules = dict(model.named_modules())
    score = sum(modules[p].weight.detach().pow(2).sum(1) for p in unit.producers)
    score = score + sum(modules[c.name].weight.detach().pow(2).sum(0) for c in unit.consumers)
    return np.argsort(-score.numpy(), kind="stable")[:k]


def half_mlp_table(steps: int, n_calib: int, n_test: int) -> tuple[list, dict]:
    """Rows (method, MLP width, FLOPs kept, held-out perplexity, ratio) and the facts: the ID
    in the three calibration modes, the ID's channels without T, magnitude."""
    model, train, held_out = trained(steps)
    calib = {"input_ids": windows(train, n_calib, seed=1)[:, :-1]}
    test = windows(held_out, n_test, seed=2)
    base = perplexity(model, test)
    fits = {mode: NetworkCompressor(model, rank=0.5, prune="channels", calibration=mode,
                                    batch_size=32).fit(calib)
            for mode in ("original", "sequential", "corrective")}
    nc = fits["original"]
    units = [s.unit for s in nc.plan_.selections]
    flops = nc.flops_["after"] / nc.flops_["before"]
    rows = [("original", INNER, 1.0, base, 1.0)]
    for name, candidate in (
        *((f"ID ({mode})", fit.compressed_model_) for mode, fit in fits.items()),
        ("ID without T", sliced(model, units, [s.keep.numpy() for s in nc.plan_.selections])),
        ("magnitude", sliced(model, units, [magnitude_channels(model, u, INNER // 2)
                                             for u in units])),
    ):
        value = perplexity(candidate, test)
        rows.append((name, INNER // 2, flops, value, value / base))
    facts = {"train tokens": len(train), "held-out tokens": len(held_out), "steps": steps,
             "groups": [u.producers for u in units]}
    return rows, facts


# ------------------------------------------------------------------------------ heads


def heads_table(steps: int, n_calib: int, n_test: int) -> list:
    """Rows (setting, method, heads kept, MLP width, FLOPs kept, perplexity, ratio): heads
    kept 2/3 and 1/3, and 2/3 of the heads with half the MLP (``rank=0.5`` on both: 2 of 3
    heads per key/value group), for ID, ID without T and magnitude at equal widths."""
    model, train, held_out = trained(steps)
    calib = {"input_ids": windows(train, n_calib, seed=1)[:, :-1]}
    test = windows(held_out, n_test, seed=2)
    base = perplexity(model, test)
    rows = [("original", "original", HEADS, INNER, 1.0, base, 1.0)]
    for label, params in (("heads 2/3", {"rank": 2 / 3, "prune": "heads"}),
                          ("heads 1/3", {"rank": 1 / 3, "prune": "heads"}),
                          ("heads 2/3 + MLP 1/2", {"rank": 0.5})):
        nc = NetworkCompressor(model, batch_size=32, **params).fit(calib)
        heads = [s for s in nc.plan_.selections if s.unit.kind == "heads"]
        groups = [s for s in nc.plan_.selections if s.unit.kind == "channels"]
        units = [s.unit for s in groups]
        without_t = sliced(heads_sliced(model, heads), units, [s.keep.numpy() for s in groups])
        magnitude = sliced(
            heads_sliced(model, [magnitude_heads(model, s) for s in heads]), units,
            [magnitude_channels(model, u, s.keep.numel()) for u, s in zip(units, groups,
                                                                          strict=True)])
        flops = nc.flops_["after"] / nc.flops_["before"]
        width = int(groups[0].keep.numel()) if groups else INNER
        for name, candidate in (("ID", nc.compressed_model_), ("ID without T", without_t),
                                ("magnitude", magnitude)):
            value = perplexity(candidate, test)
            rows.append((label, name, int(heads[0].heads.size), width, flops, value,
                         value / base))
    return rows
