"""Compressed models on disk without pickles: safetensors weights plus a JSON plan.

``torch.save(model)`` pickles classes (loading it runs code from the file), and a
``from_pretrained``-style config cannot say that every layer has its own width. The format
here holds data only: the weights (safetensors) and, per module with parameters, buffers or
integer attributes, its class name, those attributes and the shape of each tensor. Loading
shrinks a freshly built original model to those shapes and loads the weights; nothing is
imported or executed from the files, and every field of the plan is checked against the fresh
model first.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

__all__ = ["load_compressed", "save_compressed"]

FORMAT = "skid-compressed"
VERSION = 1
WEIGHTS_FILE = "model.safetensors"
PLAN_FILE = "skid_plan.json"


def save_compressed(model, path) -> Path:
    """Write a compressed model as safetensors weights and a JSON plan, without pickling.

    Parameters
    ----------
    model : NetworkCompressor or torch.nn.Module
        A fitted compressor (its ``compressed_model_`` is written, with its ``layers_`` report)
        or a model.
    path : str or path-like
        A directory, created if missing; ``model.safetensors`` and ``skid_plan.json`` are
        written into it (existing files of those names are replaced).

    Returns
    -------
    pathlib.Path
        The directory.

    See Also
    --------
    load_compressed : shrink a freshly built original to the plan and load the weights.
    """
    save_model = _safetensors().save_model
    report = None
    if not isinstance(model, nn.Module):
        if not hasattr(model, "compressed_model_"):
            raise TypeError(
                "save_compressed takes a fitted NetworkCompressor or a torch.nn.Module; got "
                f"{type(model).__name__}."
            )
        report = list(getattr(model, "layers_", []))
        model = model.compressed_model_
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError("TorchScript modules are not supported; save the nn.Module instead.")
    directory = Path(path)
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"{directory} exists and is not a directory; give a directory.")
    directory.mkdir(parents=True, exist_ok=True)
    plan = {
        "format": FORMAT,
        "version": VERSION,
        "modules": {name: _describe(module) for name, module in _described_modules(model)},
        "layers": _jsonable(report),
    }
    save_model(model, str(directory / WEIGHTS_FILE))
    (directory / PLAN_FILE).write_text(json.dumps(plan, indent=1))
    return directory


def load_compressed(model: nn.Module, path) -> nn.Module:
    """Shrink a freshly built original model to a saved plan and load the saved weights.

    Parameters
    ----------
    model : torch.nn.Module
        The uncompressed architecture, freshly built (e.g. ``AutoModel.from_config(config)``
        or the user's own constructor); its weights are replaced. It is modified in place, as
        ``load_state_dict`` does, and returned.
    path : str or path-like
        A directory written by :func:`save_compressed`.

    Returns
    -------
    torch.nn.Module
        ``model``, narrowed to the plan, with the saved weights, in eval mode. Tensors keep
        ``model``'s device and dtype.

    Raises
    ------
    ValueError
        The plan does not describe this architecture or is malformed (names the field).
        ``model`` is left unchanged when the plan is rejected.
    """
    load_model = _safetensors().load_model
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}.")
    directory = Path(path)
    plan_path, weights_path = directory / PLAN_FILE, directory / WEIGHTS_FILE
    for file in (plan_path, weights_path):
        if not file.is_file():
            raise FileNotFoundError(f"{file} not found: is {directory} a save_compressed folder?")
    try:
        plan = json.loads(plan_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{plan_path} is not valid JSON: {exc}") from exc
    changes = _checked_changes(plan, model, plan_path)  # everything checked before any change
    for module, attributes, shapes in changes:
        _resize(module, attributes, shapes)
    missing, unexpected = load_model(model, os.fspath(weights_path), strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{weights_path} does not match the plan: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}."
        )
    return model.eval()


# ----------------------------------------------------------------------------------- saving


def _safetensors():
    try:
        import safetensors.torch
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "save_compressed/load_compressed need the safetensors package: "
            "pip install 'skid[io]' (or pip install safetensors)."
        ) from exc
    return safetensors.torch


def _described_modules(model: nn.Module):
    """Modules with tensors or integer attributes (an attention block holds only its head
    counts: its forward reads them)."""
    for name, module in model.named_modules():
        if module._parameters or module._buffers or _int_attributes(module):
            yield name, module


def _tensors(module: nn.Module) -> dict:
    tensors = {k: v for k, v in module._parameters.items() if v is not None}
    tensors.update({k: v for k, v in module._buffers.items() if v is not None})
    return tensors


def _int_attributes(module: nn.Module) -> dict:
    """Public integer attributes (widths, head counts...), which a forward pass may read."""
    return {k: v for k, v in vars(module).items() if not k.startswith("_") and _is_int(v)}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _describe(module: nn.Module) -> dict:
    return {
        "class": type(module).__name__,
        "attributes": _int_attributes(module),
        "tensors": {k: list(v.shape) for k, v in _tensors(module).items()},
    }


def _jsonable(value):
    """The ``layers_`` report with NumPy scalars made plain (None stays None)."""
    def plain(v):
        return v.item() if hasattr(v, "item") else str(v)

    return json.loads(json.dumps(value, default=plain))


# ---------------------------------------------------------------------------------- loading


def _checked_changes(plan, model: nn.Module, where: Path) -> list:
    """``(module, {attribute: int}, {tensor: shape})`` per module, after checking every field."""

    def bad(message: str) -> ValueError:
        return ValueError(f"{where}: {message}; the plan must come from save_compressed.")

    if not isinstance(plan, dict) or plan.get("format") != FORMAT:
        raise bad(f"not a {FORMAT!r} plan")
    if plan.get("version") != VERSION:
        raise bad(f"format version {plan.get('version')!r} is not supported (this is {VERSION})")
    described = plan.get("modules")
    if not isinstance(described, dict):
        raise bad("'modules' must be a mapping of module names")
    modules = dict(model.named_modules())
    changes = []
    for name, entry in described.items():
        if name not in modules:
            raise bad(f"module {name!r} is not in this {type(model).__name__}")
        module = modules[name]
        if not isinstance(entry, dict) or set(entry) != {"class", "attributes", "tensors"}:
            raise bad(f"entry of {name!r} must have exactly 'class', 'attributes', 'tensors'")
        if entry["class"] != type(module).__name__:
            raise bad(
                f"{name!r} is a {entry['class']} in the plan but a {type(module).__name__} here: "
                "build the same architecture as the original"
            )
        changes.append((module, _checked_attributes(name, module, entry["attributes"], bad),
                        _checked_shapes(name, module, entry["tensors"], bad)))
    return changes


def _checked_attributes(name, module, attributes, bad) -> dict:
    if not isinstance(attributes, dict):
        raise bad(f"'attributes' of {name!r} must be a mapping")
    for key, value in attributes.items():
        current = getattr(module, key, None) if isinstance(key, str) else None
        if key.startswith("_") or not _is_int(current):
            raise bad(f"{name!r} has no integer attribute {key!r}")
        if not _is_int(value):
            raise bad(f"attribute {key!r} of {name!r} must be an integer")
    return attributes


def _checked_shapes(name, module, shapes, bad) -> dict:
    if not isinstance(shapes, dict):
        raise bad(f"'tensors' of {name!r} must be a mapping")
    tensors = _tensors(module)
    for key, shape in shapes.items():
        if key in _absent_biases(module):  # fit_intercept gave the consumer a bias
            if not (isinstance(shape, list) and len(shape) == 1 and _is_int(shape[0])
                    and shape[0] >= 0):
                raise bad(f"shape {shape!r} of the new {name}.{key} must list 1 integer")
            continue
        if key not in tensors:
            raise bad(f"{name!r} has no parameter or buffer {key!r}")
        if (
            not isinstance(shape, list)
            or len(shape) != tensors[key].ndim
            or not all(_is_int(d) and 0 <= d <= tensors[key].shape[i] for i, d in enumerate(shape))
        ):
            raise bad(
                f"shape {shape!r} of {name}.{key} must list {tensors[key].ndim} integers no "
                f"larger than {list(tensors[key].shape)} (compression only narrows)"
            )
    return shapes


def _absent_biases(module: nn.Module) -> set:
    """Bias parameters a module declares as None (``bias=False``): a plan may create them."""
    return {k for k, v in module._parameters.items() if v is None and k == "bias"}


def _resize(module: nn.Module, attributes: dict, shapes: dict) -> None:
    """Empty tensors of the planned shapes (same device/dtype) and the planned attributes."""
    for key, shape in shapes.items():
        if key in _absent_biases(module):  # created, like the weight beside it
            weight = module.weight
            module._parameters[key] = nn.Parameter(
                torch.empty(shape, dtype=weight.dtype, device=weight.device),
                requires_grad=weight.requires_grad)
            continue
        old = _tensors(module)[key]
        if list(old.shape) == shape:
            continue  # unchanged: keeps ties between modules (e.g. shared embeddings)
        new = torch.empty(shape, dtype=old.dtype, device=old.device)
        if key in module._parameters:
            module._parameters[key] = nn.Parameter(new, requires_grad=old.requires_grad)
        else:
            module._buffers[key] = new
    for key, value in attributes.items():
        setattr(module, key, value)
