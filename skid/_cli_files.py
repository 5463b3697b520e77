"""Files of ``skid compress``: the model and the calibration data in, the results out.

Every problem with a file raises :class:`InputFileError` with a message that says what is
wrong and what to do; the command line prints it and exits with code 3.
"""

from __future__ import annotations

import json
import os
import sys
import zipfile

import numpy as np
import torch


class InputFileError(Exception):
    """A file is missing, unreadable, or not what was expected."""


def check_exists(path, label):
    """Raise if ``path`` is not an existing file."""
    if not path.is_file():
        raise InputFileError(f"{label} file not found: {path}")


def check_folder_exists(path):
    """Raise if the folder that would hold ``path`` does not exist."""
    if not path.resolve().parent.is_dir():
        raise InputFileError(f"the folder of {path} does not exist")


def load_model(path, device):
    """Unpickle a whole ``nn.Module`` saved with ``torch.save(model, path)``.

    Only for files you trust: this is ``torch.load(path, weights_only=False)``, which can run
    arbitrary code. The current directory is importable, as with ``python -m``.
    """
    kind = _archive_kind(path)
    if kind is not None:
        raise InputFileError(
            f"{path} is a {kind} archive, which skid cannot rewrite layer by layer; save the "
            "eager model with torch.save(model, path) instead"
        )
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # model classes defined next to the user
    try:
        model = torch.load(path, map_location=device, weights_only=False)
    except (ImportError, AttributeError) as error:
        raise InputFileError(
            f"cannot unpickle {path}: {error}. The model's classes must be importable: if "
            "they were defined in a script, move them into a module (or save the model from "
            "one) and try again"
        ) from None
    except Exception as error:  # noqa: BLE001 - any unpickling failure is a bad input file
        raise InputFileError(f"cannot load {path}: {error}") from None
    return _check_model(model, path)


def _archive_kind(path):
    """``"TorchScript"`` or ``"torch.export"`` when ``path`` is such an archive, else None."""
    if not zipfile.is_zipfile(path):
        return None
    with zipfile.ZipFile(path) as archive:
        names = [name.split("/", 1)[-1] for name in archive.namelist()]
    if "archive_format" in names or "models/model.json" in names:
        return "torch.export"
    if "constants.pkl" in names and any(name.startswith("code/") for name in names):
        return "TorchScript"
    return None


def _check_model(model, path):
    """The loaded object must be an eager ``nn.Module`` (not a state_dict, not TorchScript)."""
    if isinstance(model, torch.jit.ScriptModule):
        raise InputFileError(
            f"{path} is a TorchScript archive, which skid cannot rewrite layer by layer; save "
            "the eager model with torch.save(model, path) instead"
        )
    if isinstance(model, dict):
        keys = ", ".join(map(str, list(model)[:5]))
        raise InputFileError(
            f"{path} holds a dict (keys: {keys}, ...), not a model; save the whole model "
            "with torch.save(model, path), not its state_dict"
        )
    if not isinstance(model, torch.nn.Module):
        raise InputFileError(f"{path} holds a {type(model).__name__}, not a torch.nn.Module")
    return model


def load_calibration(path, key, model, device):
    """Calibration inputs from .npy, .npz or .pt as a tensor on ``device``.

    Floating-point data are cast to the model's floating dtype; integer data (token ids)
    are kept as they are.
    """
    array = _read_array(path, key)
    if not isinstance(array, torch.Tensor):
        if array.dtype == object or not np.issubdtype(array.dtype, np.number):
            raise InputFileError(f"{path} holds {array.dtype} data, not numbers")
        array = torch.from_numpy(np.ascontiguousarray(array))
    if array.ndim == 0 or len(array) == 0:
        raise InputFileError(
            f"{path} holds no samples (shape {tuple(array.shape)}); the calibration data "
            "needs one row per sample"
        )
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    if array.is_floating_point() and dtype is not None:
        array = array.to(dtype)
    return array.to(device)


def _read_array(path, key):
    """The raw array in ``path``: a NumPy array, or a tensor for .pt files."""
    try:
        if path.suffix == ".pt":
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        else:
            loaded = np.load(path, allow_pickle=False)
    except Exception as error:  # noqa: BLE001 - any reading failure is a bad input file
        raise InputFileError(f"cannot read {path}: {error}") from None
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            return _pick_npz_array(loaded, key, path)
    if not isinstance(loaded, np.ndarray | torch.Tensor):
        raise InputFileError(f"{path} holds a {type(loaded).__name__}, not a tensor")
    return loaded


def _pick_npz_array(archive, key, path):
    """The array named ``key`` in an .npz, or its only array when ``key`` is None."""
    names = list(archive.files)
    if key is None and len(names) == 1:
        key = names[0]
    if key not in names:
        hint = "pass --data-key with one of" if key is None else f"no array {key!r}; it has"
        raise InputFileError(f"{path}: {hint} {', '.join(names)}")
    return archive[key]


def save_model(model, path):
    """``torch.save`` the whole model."""
    try:
        torch.save(model, path)
    except OSError as error:
        raise InputFileError(f"cannot write {path}: {error}") from None


def write_json(data, path):
    """Write ``data`` as indented JSON."""
    try:
        path.write_text(json.dumps(data, indent=2) + "\n")
    except OSError as error:
        raise InputFileError(f"cannot write {path}: {error}") from None
