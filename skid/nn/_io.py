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

import itertools
import json
import math
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from ._mha import PRUNED_FORMS

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
    # safetensors creates its file 0600; give the weights the plan's (umask-given) mode
    shutil.copymode(directory / PLAN_FILE, directory / WEIGHTS_FILE)
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
    _check_materialised(model)
    try:
        plan = json.loads(plan_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{plan_path} is not valid JSON: {exc}") from exc
    # everything checked before any change: the plan, then the weights file's header
    changes = _checked_changes(plan, model, plan_path)
    _check_weights(weights_path, model, changes)
    undo = []
    try:
        for module, convert, revert in _pruned_forms(plan, model):
            convert(module)  # the class the compressor gave the pruned block (same tensors)
            undo.append(lambda module=module, revert=revert: revert(module))
        for module, attributes, shapes in changes:
            undo.append(_resize(module, attributes, shapes))
        missing, unexpected = load_model(model, os.fspath(weights_path), strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{weights_path} does not match the plan: missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]}."
            )
    except BaseException:
        for restore in reversed(undo):  # the model as it was: its own tensors and attributes
            restore()
        raise
    return model.eval()


def _check_materialised(model: nn.Module) -> None:
    """Refuse a model whose tensors have no storage (built on the ``meta`` device)."""
    meta = [n for n, t in itertools.chain(model.named_parameters(), model.named_buffers())
            if t.is_meta]
    if meta:
        raise ValueError(
            f"load_compressed needs a model with real tensors, but {meta[0]!r} (and "
            f"{len(meta) - 1} more) is on the meta device: build the model on a real device "
            "(e.g. outside torch.device('meta'), or call model.to_empty(device='cpu') and "
            "re-initialise its non-persistent buffers) before loading."
        )


# ----------------------------------------------------------------------------------- saving


def _safetensors():
    try:
        import safetensors.torch
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "save_compressed/load_compressed need the safetensors package, a dependency of "
            "skid: pip install safetensors."
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
        pruned = _pruned_form(module, entry["class"]) is not None
        if entry["class"] != type(module).__name__ and not pruned:
            raise bad(
                f"{name!r} is a {entry['class']} in the plan but a {type(module).__name__} here: "
                "build the same architecture as the original"
            )
        attributes = _checked_attributes(name, module, entry["attributes"], bad)
        shapes = _checked_shapes(name, module, entry["tensors"], bad)
        _check_widths(name, module, attributes, shapes, bad)
        changes.append((module, attributes, shapes))
    return changes


def _pruned_form(module: nn.Module, class_name):
    """``(convert, revert)`` in place between ``module``'s class and ``class_name``, when that
    is the class the compressor gives such a module with fewer heads
    (``PrunedMultiheadAttention``), else None."""
    base, *conversions = PRUNED_FORMS.get(class_name, (None,))
    return tuple(conversions) if base is not None and type(module) is base else None


def _pruned_forms(plan, model: nn.Module) -> list:
    """``(module, convert, revert)`` for the modules of a checked plan saved in such a class."""
    modules = dict(model.named_modules())
    found = []
    for name, entry in plan["modules"].items():
        form = _pruned_form(modules[name], entry["class"])
        if entry["class"] != type(modules[name]).__name__ and form is not None:
            found.append((modules[name], *form))
    return found


def _checked_attributes(name, module, attributes, bad) -> dict:
    if not isinstance(attributes, dict):
        raise bad(f"'attributes' of {name!r} must be a mapping")
    for key, value in attributes.items():
        current = getattr(module, key, None) if isinstance(key, str) else None
        if key.startswith("_") or not _is_int(current):
            raise bad(f"{name!r} has no integer attribute {key!r}")
        if not _is_int(value):
            raise bad(f"attribute {key!r} of {name!r} must be an integer")
        if value != current and not 0 <= value <= current:
            raise bad(f"attribute {key!r} of {name!r} is {value}, but compression only narrows: "
                      f"it must lie in [0, {current}] (this model's value)")
    return attributes


# a module's width attributes and the tensor dimension each must equal (its forward reads both)
_WIDTHS = {
    nn.Linear: {"out_features": ("weight", 0), "in_features": ("weight", 1)},
    nn.Embedding: {"num_embeddings": ("weight", 0), "embedding_dim": ("weight", 1)},
    nn.modules.conv._ConvNd: {"out_channels": ("weight", 0)},
    nn.modules.batchnorm._NormBase: {"num_features": ("running_mean", 0)},
}


def _check_widths(name, module, attributes, shapes, bad) -> None:
    """The planned width attributes agree with the planned tensor shapes."""
    tensors = _tensors(module)
    for cls, widths in _WIDTHS.items():
        if not isinstance(module, cls) or getattr(module, "transposed", False):
            continue
        for attribute, (tensor, dim) in widths.items():
            if tensor not in tensors or not _is_int(getattr(module, attribute, None)):
                continue
            value = attributes.get(attribute, getattr(module, attribute))
            shape = shapes.get(tensor, list(tensors[tensor].shape))
            if value != shape[dim]:
                raise bad(f"attribute {attribute!r} of {name!r} is {value} but its {tensor} "
                          f"has {shape[dim]} along dimension {dim}")


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
        if key in module._non_persistent_buffers_set and list(tensors[key].shape) != shape:
            raise bad(
                f"{name}.{key} is a non-persistent buffer narrowed by the compression: its "
                "values are not in the saved weights, so it cannot be restored (torch.save the "
                "compressed model instead)"
            )
    return shapes


def _absent_biases(module: nn.Module) -> set:
    """Bias parameters a module declares as None (``bias=False``): a plan may create them
    (``fit_intercept`` gives a consumer a bias)."""
    return {k for k, v in module._parameters.items() if v is None and k == "bias"}


def _resize(module: nn.Module, attributes: dict, shapes: dict):
    """Empty tensors of the planned shapes (same device/dtype) and the planned attributes;
    returns the function that puts the module back as it was."""
    tensors, values = dict(_tensors(module)), {k: getattr(module, k) for k in attributes}
    created = [k for k in shapes if k in _absent_biases(module)]

    def restore():
        for key, tensor in tensors.items():
            where = module._parameters if key in module._parameters else module._buffers
            where[key] = tensor
        for key in created:
            module._parameters[key] = None
        for key, value in values.items():
            setattr(module, key, value)

    for key, shape in shapes.items():
        if key in created:  # a new bias, like the weight beside it
            weight = module.weight
            module._parameters[key] = nn.Parameter(
                torch.empty(shape, dtype=weight.dtype, device=weight.device),
                requires_grad=weight.requires_grad)
            continue
        old = tensors[key]
        if list(old.shape) == shape:
            continue  # unchanged: keeps ties between modules (e.g. shared embeddings)
        new = torch.empty(shape, dtype=old.dtype, device=old.device)
        if key in module._parameters:
            module._parameters[key] = nn.Parameter(new, requires_grad=old.requires_grad)
        else:
            module._buffers[key] = new
    for key, value in attributes.items():
        setattr(module, key, value)
    if isinstance(getattr(module, "normalized_shape", None), tuple) and "weight" in shapes:
        values.setdefault("normalized_shape", module.normalized_shape)  # put back on failure
        module.normalized_shape = tuple(shapes["weight"])  # a narrowed stream's LayerNorm
    return restore


# ------------------------------------------------------------------------ the weights file

# safetensors dtype codes by kind: a file tensor must be of its model tensor's kind
_KINDS = {"F": "float", "BF": "float", "I": "int", "U": "int", "BOOL": "bool", "C": "complex"}
_ITEM_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2,
               "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
               "C64": 8, "C128": 16}


def _kind_of_code(code: str):
    for prefix in ("BOOL", "BF", "F", "I", "U", "C"):
        if code.startswith(prefix):
            return _KINDS[prefix]
    return None


def _kind_of(tensor) -> str:
    if tensor.dtype == torch.bool:
        return "bool"
    if tensor.is_complex():
        return "complex"
    return "float" if tensor.is_floating_point() else "int"


def _header(path: Path) -> dict:
    """The safetensors header of ``path`` (name → dtype, shape), checked against the file's
    size: a truncated or padded file is refused."""

    def bad(message):
        return ValueError(f"{path}: {message}; save it again with save_compressed.")

    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise bad("the file is too short to be a safetensors file")
        n = int.from_bytes(head, "little")
        if n > size - 8:
            raise bad(f"the header claims {n} bytes but the file has {size - 8} after it "
                      "(truncated?)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise bad(f"the header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise bad("the header is not a mapping")
    header.pop("__metadata__", None)
    end = 0
    for name, entry in header.items():
        try:
            dtype, shape, (begin, stop) = entry["dtype"], entry["shape"], entry["data_offsets"]
            nbytes = _ITEM_BYTES[dtype] * math.prod(shape)
        except (KeyError, TypeError, ValueError) as exc:
            raise bad(f"the entry of {name!r} is malformed") from exc
        if stop - begin != nbytes:
            raise bad(f"{name!r} holds {stop - begin} bytes, not the {nbytes} of a {dtype} "
                      f"tensor of shape {shape}")
        end = max(end, stop)
    if 8 + n + end != size:
        raise bad(f"the tensors end at byte {8 + n + end} but the file has {size} bytes "
                  "(truncated or damaged)")
    return header


def _check_weights(path: Path, model: nn.Module, changes) -> None:
    """The weights file names every tensor of the planned model (a tied tensor once), each
    with the planned shape and a dtype of its kind; else a ValueError naming file and field."""
    header = _header(path)
    planned = {}  # id of a module's tensor → its planned shape
    created = {}  # name → shape of a bias the plan creates (fit_intercept)
    names = {id(m): n for n, m in model.named_modules()}
    for module, _, shapes in changes:
        tensors = _tensors(module)
        for k, shape in shapes.items():
            if k in tensors:
                planned[id(tensors[k])] = shape
            else:
                created[f"{names[id(module)]}.{k}".lstrip(".")] = shape
    state = model.state_dict(keep_vars=True)
    for name, shape in created.items():
        entry = header.get(name)
        if entry is None or list(entry["shape"]) != list(shape):
            raise ValueError(f"{path} has no tensor {name!r} of shape {list(shape)}, which the "
                             "plan creates: the weights and the plan come from different saves")
        if _kind_of_code(entry["dtype"]) != "float":
            raise ValueError(f"{path}: {name!r} is {entry['dtype']}, not a float tensor")
    unexpected = sorted(set(header) - set(state) - set(created))
    if unexpected:
        raise ValueError(f"{path} holds {unexpected[0]!r} ({len(unexpected)} such), which this "
                         f"{type(model).__name__} does not have: is it the weights of this "
                         "plan's model?")
    stored = {_storage(state[name]) for name in header if name not in created}
    for name, tensor in state.items():
        shape = planned.get(id(tensor), list(tensor.shape))
        if name not in header:
            if _storage(tensor) in stored:
                continue  # a tie: saved once under another name
            raise ValueError(f"{path} has no tensor {name!r}: is it the weights of this "
                             "plan's model?")
        entry = header[name]
        if list(entry["shape"]) != list(shape):
            raise ValueError(f"{path}: {name!r} has shape {entry['shape']} but the plan gives "
                             f"{list(shape)}: the weights and the plan come from different saves")
        if _kind_of_code(entry["dtype"]) != _kind_of(tensor):
            raise ValueError(f"{path}: {name!r} is {entry['dtype']} but the model's tensor is "
                             f"{tensor.dtype}: is it the weights of this plan's model?")


def _storage(tensor):
    return tensor.untyped_storage().data_ptr() if tensor.numel() else id(tensor)
