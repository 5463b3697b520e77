"""A canonical text of the code a model runs, for the content keys of the ``memory=`` cache.

``repr(model)`` shows the module tree, not ``forward``: two models with the same weights and
the same ``repr`` may compute different things (``relu`` edited into ``tanh``), and a cache
keyed on ``repr`` would hand one the other's statistics. :func:`describe_execution` records
one forward pass (:func:`skid.nn._trace.record`) and writes every executed op, in order: its
name, the module it belongs to (class and configuration for modules recorded as one node),
which values it reads — a named parameter or buffer, a model input, the output of an earlier
op, or a constant tensor by content — its non-tensor arguments, and the shapes it produces.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Mapping

import torch
from torch import nn

from ._trace import record

__all__ = ["describe_execution"]

_ADDRESS = re.compile(r"0x[0-9a-fA-F]+")  # object addresses differ from run to run


def describe_execution(model: nn.Module, args: tuple, kwargs: dict | None = None) -> str:
    """The ops one forward pass of ``model`` on ``(args, kwargs)`` executes, as text.

    Parameters
    ----------
    model : torch.nn.Module
        Run once in eval mode under ``no_grad``; its training flags are restored and its
        parameters are not modified.
    args : tuple
        Positional inputs of a small example batch.
    kwargs : dict, default=None
        Keyword inputs of the same batch.

    Returns
    -------
    description : str
        One line per executed op, then the model outputs. Equal for two models that run the
        same ops on the same named tensors, whatever their Python objects.
    """
    kwargs = dict(kwargs or {})
    graph = record(model, tuple(args), kwargs)
    labels = _source_labels(graph, model, _leaves((args, kwargs)))
    lines = []
    for index, node in enumerate(graph.nodes):
        refs = iter(node.inputs)
        if node.module is not None:
            module = graph.modules[node.module]
            what = f"{_qualname(type(module))}({module.extra_repr()}) {node.module!r}"
            arguments = " ".join(_ref(v, labels) for v in node.inputs)
        else:
            what = node.name
            arguments = _canonical((node.args, node.kwargs), refs, labels)
        shapes = " ".join(f"%{v}{list(graph.values[v].shape)}" for v in node.outputs)
        lines.append(f"{index} {what} <- {arguments} -> {shapes}")
    lines.append("outputs " + " ".join(f"%{v}" for v in sorted(graph.outputs)))
    return _ADDRESS.sub("0x?", "\n".join(lines))


def _source_labels(graph, model: nn.Module, inputs: list) -> dict[int, str]:
    """Names of the values no op produced: parameters, buffers, inputs, constants by content."""
    names = {}
    for name, tensor in (*model.named_parameters(), *model.named_buffers()):
        names.setdefault(id(tensor), name)
    positions = {id(t): i for i, t in reversed(list(enumerate(inputs)))}
    labels = {}
    for value, tensor in graph.source_tensors():
        if id(tensor) in names:
            labels[value] = f"param:{names[id(tensor)]}"
        elif id(tensor) in positions:
            labels[value] = f"input:{positions[id(tensor)]}"
        else:  # e.g. a plain tensor attribute: not in the state_dict, so its content counts
            labels[value] = f"const:{_content_hash(tensor)}"
    return labels


def _content_hash(tensor: torch.Tensor) -> str:
    flat = tensor.detach().reshape(-1).contiguous().cpu()
    digest = hashlib.blake2b(flat.view(torch.uint8).numpy().tobytes(), digest_size=10)
    return f"{tensor.dtype}{list(tensor.shape)}:{digest.hexdigest()}"


def _ref(value: int, labels: dict) -> str:
    return f"%{value}" + (f"={labels[value]}" if value in labels else "")


def _canonical(obj, refs, labels) -> str:
    """Arguments as text; tensors become value references, in the order the recorder saw them.

    Walks containers exactly as :func:`skid.nn._trace._tensor_leaves` does, so the n-th tensor
    met here is the n-th input of the node.
    """
    if isinstance(obj, torch.Tensor):
        value = next(refs, None)
        return "%?" if value is None else _ref(value, labels)
    if isinstance(obj, Mapping):
        items = ", ".join(f"{k!r}: {_canonical(v, refs, labels)}" for k, v in obj.items())
        return "{" + items + "}"
    if isinstance(obj, (list, tuple)):
        return "(" + ", ".join(_canonical(item, refs, labels) for item in obj) + ")"
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = (f"{f.name}={_canonical(getattr(obj, f.name), refs, labels)}"
                  for f in dataclasses.fields(obj))
        return f"{_qualname(type(obj))}(" + ", ".join(fields) + ")"
    if callable(obj) and hasattr(obj, "__qualname__"):
        return _qualname(obj)
    return repr(obj)


def _qualname(obj) -> str:
    return f"{getattr(obj, '__module__', '?')}.{obj.__qualname__}"


def _leaves(obj) -> list:
    """Tensors inside nested containers, in the recorder's order (the model inputs here)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, Mapping):
        return [t for v in obj.values() for t in _leaves(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _leaves(v)]
    return []
