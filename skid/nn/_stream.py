"""The residual stream of a pre-norm transformer: who writes it, who reads it, through which norm.

A transformer's hidden size is one width shared by everything that touches the stream: the
embeddings and every layer whose output is added into it (*writers*), the norm in front of
every sublayer and the final norm (*norms*, whose gains are per stream coordinate), and the
dense layers reading a norm's output (*readers*: q/k/v, the MLP's input projections, the output
head). :func:`find_stream` describes it by name from a small table of Hugging Face layouts
(:data:`LAYOUTS`), keyed by ``config.model_type``; the surgery (:mod:`._rotation`) then changes
those modules together, and :func:`check_stream` proves the description on the model itself: a
random rotation of the whole stream at full width must leave the outputs unchanged, or the
stream is skipped with that reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ._plan import Consumer, Skipped

__all__ = ["LAYOUTS", "Norm", "Stream", "StreamLayout", "find_stream"]


@dataclass(frozen=True)
class Norm:
    """One norm reading the stream, and the dense layers that read the norm's output."""

    name: str
    readers: tuple[str, ...]


@dataclass(frozen=True)
class Stream:
    """The residual stream as one prunable width (``kind="residual"``).

    Attributes
    ----------
    width : int
        The hidden size.
    writers : tuple of str
        What writes the stream: embeddings (``nn.Embedding``), stream-sized parameters
        (``"module.parameter"``, e.g. ViT's class token and position embeddings) and dense
        layers whose output is added into it, in forward order.
    norms : tuple of Norm
        Every norm reading the stream (the sublayers' norms and the final one), in forward order.
    form : {"rms", "rms_offset", "layer"}
        ``"rms"``: ``g ⊙ x / rms(x)``; ``"rms_offset"``: Gemma's ``(1 + w) ⊙ x / rms(x)``;
        ``"layer"``: LayerNorm (writers are made zero-mean, then it acts as an RMS norm).
    tied : tuple of (str, str)
        ``(head, embedding)`` pairs sharing one weight; the rotation unties them.
    config_field : str or None
        The model config's name for the hidden size (``"hidden_size"``, ``"n_embd"``).
    parameters : tuple of str
        The writers that are parameters rather than modules (no FLOPs of their own).
    """

    width: int
    writers: tuple[str, ...]
    norms: tuple[Norm, ...]
    form: str
    tied: tuple = ()
    config_field: str | None = "hidden_size"
    parameters: tuple[str, ...] = ()
    kind: str = "residual"

    @property
    def readers(self) -> tuple[str, ...]:
        return tuple(r for norm in self.norms for r in norm.readers)

    @property
    def producer(self) -> str:
        """The first writer (the embedding): the row's ``producer``."""
        return self.writers[0]

    @property
    def consumer(self) -> str:
        """The last reader (the output head): the row's ``consumer``."""
        return self.readers[-1]

    @property
    def producers(self) -> tuple[str, ...]:
        return self.writers

    @property
    def consumers(self) -> tuple[Consumer, ...]:
        """The readers, as the FLOP model and the width rules see a unit's consumers."""
        return tuple(Consumer(r) for r in self.readers)

    @property
    def offsets(self) -> tuple:
        return ()

    def before(self, name: str) -> tuple:
        """The stream is never part of a concatenation (FlopsModel's question)."""
        return ()

    def modules(self) -> tuple[str, ...]:
        """Every module whose FLOPs scale with the stream's width (parameters left out)."""
        writers = tuple(w for w in self.writers if w not in self.parameters)
        return (*writers, *(n.name for n in self.norms), *self.readers)


@dataclass(frozen=True)
class StreamLayout:
    """Where a model family keeps its stream, relative to the module holding the blocks.

    ``writers``/``heads`` name modules or ``"module.parameter"`` paths; ``norms`` pairs each
    block's norm with the block's layers that read it. ``heads`` are the final norm's readers,
    looked up both under the base module and at the model's root (``lm_head``, ``score``,
    ``classifier``); those that are absent are ignored, and :func:`check_stream` catches a
    reader the table does not know.
    """

    blocks: str
    writers: tuple[str, ...]
    norms: tuple[tuple[str, tuple[str, ...]], ...]
    block_writers: tuple[str, ...]
    final_norm: str
    heads: tuple[str, ...]
    form: str = "rms"
    config_field: str = "hidden_size"


_LLAMA = StreamLayout(
    blocks="layers",
    writers=("embed_tokens",),
    norms=(("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
           ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"))),
    block_writers=("self_attn.o_proj", "mlp.down_proj"),
    final_norm="norm",
    heads=("lm_head", "score"),
)

#: ``config.model_type`` → layout. Pre-norm decoders and encoders whose every sublayer reads
#: the stream through its own norm and adds its output back.
LAYOUTS = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma": StreamLayout(**{**_LLAMA.__dict__, "form": "rms_offset"}),
    "gpt2": StreamLayout(
        blocks="h",
        writers=("wte", "wpe"),
        norms=(("ln_1", ("attn.c_attn",)), ("ln_2", ("mlp.c_fc",))),
        block_writers=("attn.c_proj", "mlp.c_proj"),
        final_norm="ln_f",
        heads=("lm_head", "score"),
        form="layer",
        config_field="n_embd",
    ),
    "vit": StreamLayout(
        blocks="layers",
        writers=("embeddings.patch_embeddings.projection", "embeddings.cls_token",
                 "embeddings.mask_token", "embeddings.position_embeddings"),
        norms=(("layernorm_before", ("attention.q_proj", "attention.k_proj",
                                     "attention.v_proj")),
               ("layernorm_after", ("mlp.fc1",))),
        block_writers=("attention.o_proj", "mlp.fc2"),
        final_norm="layernorm",
        heads=("pooler.dense", "classifier"),
        form="layer",
    ),
}

#: Why a known family's stream is left alone.
_NOT_SUPPORTED = {
    "bert": "BERT-style post-norm: the norm follows the residual add, so no rotation of the "
            "stream passes through it (not supported yet)",
    "roberta": "post-norm (as BERT): not supported yet",
    "gemma2": "Gemma 2 normalizes each sublayer's output before the add (sandwich norms): a "
              "rotation does not pass through those norms",
    "gemma3": "Gemma 3 normalizes each sublayer's output before the add (sandwich norms)",
    "mixtral": "mixture-of-experts readers (router and experts) are not described yet",
}


def find_stream(model: nn.Module) -> tuple[Stream | None, Skipped | None]:
    """The model's residual stream, or ``(None, Skipped(...))`` saying why there is none."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    root = type(model).__name__
    if model_type in _NOT_SUPPORTED:
        return None, Skipped(root, f"residual stream: {_NOT_SUPPORTED[model_type]}")
    layout = LAYOUTS.get(model_type)
    if layout is None:
        what = f"model_type {model_type!r}" if model_type else f"a {root} (no HF config)"
        return None, Skipped(
            root, f"residual stream: {what} is not a known transformer layout (known: "
                  f"{', '.join(sorted(LAYOUTS))}); its hidden size is left alone")
    base = _base(model, layout)
    if base is None:
        return None, Skipped(root, f"residual stream: no {layout.blocks!r} list of blocks with "
                                   f"a final {layout.final_norm!r} norm found")
    prefix = f"{base}." if base else ""
    names = dict(model.named_modules())
    params = dict(model.named_parameters(remove_duplicate=False))
    writers = [prefix + w for w in layout.writers if prefix + w in names or prefix + w in params]
    norms = []
    blocks = model.get_submodule(prefix + layout.blocks)
    for i in range(len(blocks)):
        block = f"{prefix}{layout.blocks}.{i}."
        for norm, readers in layout.norms:
            norms.append(Norm(block + norm, tuple(block + r for r in readers)))
        writers.extend(block + w for w in layout.block_writers)
    heads = [h for h in ([prefix + h for h in layout.heads] + list(layout.heads)) if h in names]
    norms.append(Norm(prefix + layout.final_norm, tuple(dict.fromkeys(heads))))
    missing = [n for n in (*writers, *(m.name for m in norms), *(r for m in norms
                                                                  for r in m.readers))
               if n not in names and n not in params]
    if missing:
        return None, Skipped(root, f"residual stream: modules {missing} of the {model_type} "
                                   "layout are missing")
    width = _norm_width(names[norms[0].name])
    if not heads:
        return None, Skipped(
            root, "residual stream: the model outputs the stream itself (its last hidden "
                  "state), so its hidden size is the output's width; compress the model with "
                  "its head (e.g. ...ForCausalLM) to prune it")
    tied = tuple((h, w) for h in heads for w in writers
                 if w in names and getattr(names[h], "weight", None) is not None
                 and names[h].weight is getattr(names[w], "weight", None))
    stream = Stream(width=width, writers=tuple(writers), norms=tuple(norms), form=layout.form,
                    tied=tied, config_field=layout.config_field,
                    parameters=tuple(w for w in writers if w not in names))
    return stream, None


def _base(model: nn.Module, layout: StreamLayout) -> str | None:
    """The qualified name of the module holding the blocks and the final norm."""
    for name, module in model.named_modules():
        blocks = getattr(module, layout.blocks, None)
        if isinstance(blocks, nn.ModuleList) and len(blocks) and isinstance(
                getattr(module, layout.final_norm, None), nn.Module):
            return name
    return None


def _norm_width(norm: nn.Module) -> int:
    weight = getattr(norm, "weight", None)
    if weight is None or weight.ndim != 1:
        raise ValueError(f"{type(norm).__name__} has no per-coordinate gain")
    return int(weight.shape[0])


def get(model: nn.Module, name: str):
    """A module or a ``module.parameter`` of ``model`` by qualified name."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        owner, _, attr = name.rpartition(".")
        return getattr(model.get_submodule(owner), attr)


def random_rotation(width: int, seed: int = 0) -> torch.Tensor:
    """A random orthogonal (width, width) float64 matrix (the full-width check's rotation)."""
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(width, width, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))
