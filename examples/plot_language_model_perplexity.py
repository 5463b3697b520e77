"""
Compressing a language model: perplexity against FLOPs
======================================================

We train a tiny LLaMA-shaped causal language model (Hugging Face ``transformers``) on bytes of
Python's own standard library, then narrow every MLP to the same fraction of its channels three
ways and compare held-out perplexity:

* **ID** — :class:`skid.NetworkCompressor`: the channels an interpolative decomposition of the
  MLP activations keeps, with the interpolation matrix ``T`` folded into ``down_proj``;
* **ID without T** — the same channels, ``down_proj`` just drops the others (what the fold adds);
* **magnitude** — the channels of largest weight norm (gate and up rows, down column).

The calibration is a few hundred unlabeled text windows; nothing is retrained.
"""

# %%
# Data and model
# --------------
# Byte-level tokens (a vocabulary of 256): windows of 33 bytes, the last one only a target.
import copy
import sysconfig
import time
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from skid import InterpolativeDecomposition, NetworkCompressor, metrics

files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
text = b"".join(path.read_bytes() for path in files[:40])
tokens = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
split = int(0.9 * len(tokens))


def windows(data, n, seed, length=33):
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(data) - length, (n,), generator=generator)
    return torch.stack([data[s : s + length] for s in starts.tolist()])


threads = torch.get_num_threads()
torch.set_num_threads(1)  # a model this small runs fastest on one thread
torch.manual_seed(0)
config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
lm = LlamaForCausalLM(config)
optimizer = torch.optim.AdamW(lm.parameters(), lr=3e-3)
lm.train()
start = time.perf_counter()
for step in range(300):
    batch = windows(tokens[:split], 16, seed=step)
    loss = lm(input_ids=batch, labels=batch).loss
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
lm.eval()
print(f"trained in {time.perf_counter() - start:.0f} s")

calibration = windows(tokens[:split], 128, seed=10_000)
test = windows(tokens[split:], 64, seed=20_000)


def perplexity(model):
    """exp of the mean next-token cross-entropy on the held-out windows."""
    with torch.no_grad():
        return torch.exp(model(input_ids=test, labels=test).loss).item()


print(f"original model: held-out perplexity {perplexity(lm):.2f} (a uniform guess: 256)")

# %%
# The three ways at the same widths
# ---------------------------------
# ``NetworkCompressor(rank=r, prune="channels")`` keeps the fraction ``r`` of every MLP's
# channels. For the baselines, the MLP activations (what ``down_proj`` reads) are recorded on
# the same calibration text; :class:`skid.InterpolativeDecomposition` of them gives the ID's
# channels, which are then kept without ``T``.


def mlp_activations(model, data):
    """The input of every ``down_proj`` on ``data``: (windows × positions, channels)."""
    seen, hooks = [], []
    for layer in model.model.layers:
        hook = layer.mlp.down_proj.register_forward_pre_hook(
            lambda module, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))
        hooks.append(hook)
    with torch.no_grad():
        model(input_ids=data)
    for hook in hooks:
        hook.remove()
    return seen


def sliced(model, keeps):
    """A copy whose MLP ``i`` keeps channels ``keeps[i]``; ``down_proj`` drops the others."""
    small = copy.deepcopy(model)
    for layer, keep in zip(small.model.layers, keeps, strict=True):
        mlp, keep = layer.mlp, torch.as_tensor(sorted(keep))
        for name in ("gate_proj", "up_proj"):
            new = nn.Linear(config.hidden_size, len(keep), bias=False)
            new.weight.data = getattr(mlp, name).weight.data[keep].clone()
            setattr(mlp, name, new)
        down = nn.Linear(len(keep), config.hidden_size, bias=False)
        down.weight.data = mlp.down_proj.weight.data[:, keep].clone()
        mlp.down_proj = down
    return small


def magnitude(model, k):
    """Per MLP, the ``k`` channels with the largest squared weight norm."""
    keeps = []
    for layer in model.model.layers:
        mlp = layer.mlp
        score = (mlp.gate_proj.weight.pow(2).sum(1) + mlp.up_proj.weight.pow(2).sum(1)
                 + mlp.down_proj.weight.pow(2).sum(0))
        keeps.append(score.argsort(descending=True)[:k].tolist())
    return keeps


activations = mlp_activations(lm, calibration)
rows = []
for fraction in (0.125, 0.25, 0.5):
    nc = NetworkCompressor(rank=fraction, prune="channels").fit(lm, calibration)
    k = nc.layers_[0]["width_after"]
    id_channels = [InterpolativeDecomposition(rank=k).fit(z.double().numpy()).selected_features_
                   for z in activations]
    flops = metrics.flops_kept(nc)
    rows.append({"FLOPs kept": flops, "MLP width": k, "ID": perplexity(nc.compressed_model_),
                 "ID without T": perplexity(sliced(lm, id_channels)),
                 "magnitude": perplexity(sliced(lm, magnitude(lm, k)))})
    print(f"{k:4d} of 256 channels, {flops:.0%} of the FLOPs: "
          f"ID {rows[-1]['ID']:.2f}, ID without T {rows[-1]['ID without T']:.2f}, "
          f"magnitude {rows[-1]['magnitude']:.2f}; per-token agreement of the ID "
          f"{metrics.agreement(nc, test):.3f}")

# %%
# ``metrics.perplexity_ratio`` gives the same comparison as a scorer (compressed ÷ original,
# lower is better), for ``GridSearchCV`` with ``most_compressed(max_perplexity_ratio=...)``.
print(f"perplexity ratio of the last ID model: {metrics.perplexity_ratio(nc, test):.3f}")

# %%
# Perplexity against FLOPs
# ------------------------
fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
for method, marker in (("ID", "o"), ("ID without T", "s"), ("magnitude", "^")):
    ax.plot([r["FLOPs kept"] for r in rows], [r[method] for r in rows], marker=marker,
            label=method)
ax.axhline(perplexity(lm), color="0.4", linestyle=":", label="original")
ax.set(xlabel="fraction of the model's FLOPs kept", ylabel="held-out perplexity",
       title="tiny LLaMA, every MLP narrowed (no fine-tuning)")
ax.grid(alpha=0.3)
ax.legend()
plt.show()
torch.set_num_threads(threads)  # as it was, for whatever runs next in this process
