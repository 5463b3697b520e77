"""Files of ``skid compress``: the model and the calibration data in, the results out.

Every problem with a file raises :class:`InputFileError` with a message that says what is
wrong and what to do; the command line prints it and exits with code 3.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import sys
import tempfile
import zipfile

import numpy as np
import torch
import torch.nn.functional as F


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


def check_writable(path, option):
    """Raise unless a file can be written at ``path`` (checked before any work is done)."""
    if path.is_dir():
        raise InputFileError(
            f"{option} {path} is a directory; give the path of a file in it, e.g. "
            f"{path / 'compressed.pt'}"
        )
    check_folder_exists(path)
    if path.exists() and not os.access(path, os.W_OK):
        raise InputFileError(f"cannot write {path}: the file is read-only")
    folder = path.resolve().parent
    try:  # os.access is not enough: root, ACLs, read-only mounts
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise InputFileError(
            f"cannot write {path}: cannot create a file in {folder} ({error.strerror})"
        ) from None


def check_can_write_format(fmt):
    """Before any work: the package that writes ``--format fmt`` imports (exit 3 otherwise)."""
    if fmt != "safetensors":
        return
    try:
        import safetensors.torch  # noqa: F401
    except ImportError as error:
        raise InputFileError(
            f"cannot write --format safetensors: {error}; pip install safetensors (a "
            "dependency of skid) or use --format pt"
        ) from None


def check_folder_writable(path, option):
    """Raise unless ``path`` is, or can be created as, a folder (checked before any work)."""
    if path.exists() and not path.is_dir():
        raise InputFileError(
            f"{option} {path} is a file; --format safetensors writes a folder: give a folder "
            "path (it is created if missing)"
        )
    check_folder_exists(path)


def same_file(a, b):
    """Whether two paths name one file: the same path, a symbolic or a hard link."""
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return os.path.normcase(a.resolve()) == os.path.normcase(b.resolve())


def load_model(path, device, *, trust_pickle=False):
    """Load a whole ``nn.Module`` saved with ``torch.save(model, path)``.

    By default with ``torch.load(path, weights_only=True)``, which runs no code from the file,
    the torch.nn module classes allowed: a model built from them (``nn.Sequential`` of
    ``Linear``, ``Conv2d``, ``BatchNorm2d``, activations ...) loads. ``trust_pickle=True``
    unpickles with ``weights_only=False`` (any class, and any code the file holds); the current
    directory is then importable, searched after everything else on ``sys.path``.
    """
    kind = _archive_kind(path)
    if kind is not None:
        raise InputFileError(
            f"{path} is a {kind} archive, which skid cannot rewrite layer by layer; save the "
            "eager model with torch.save(model, path) instead"
        )
    try:
        if trust_pickle:
            with _current_directory_importable():
                model = torch.load(path, map_location=device, weights_only=False)
        else:
            with _torch_nn_allowed():
                model = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as error:
        if trust_pickle or "weights_only" not in str(error).lower().replace(" ", "_"):
            raise InputFileError(f"cannot load {path}: {error}") from None
        raise InputFileError(_refused_message(path, error)) from None
    except (ImportError, AttributeError) as error:
        raise InputFileError(
            f"cannot unpickle {path}: {error}. The model's classes must be importable: if "
            "they were defined in a script, move them into a module (or save the model from "
            "one) and try again"
        ) from None
    except Exception as error:  # noqa: BLE001 - any unpickling failure is a bad input file
        raise InputFileError(
            f"cannot load {path}: is it a model saved with torch.save? "
            f"({type(error).__name__}: {error})"
        ) from None
    return _check_model(model, path)


# torch.nn functions that modules keep as attributes (TransformerEncoderLayer's activation)
_NN_FUNCTIONS = ("relu", "gelu", "silu", "tanh", "sigmoid", "elu", "selu", "celu", "leaky_relu",
                 "hardswish", "hardsigmoid", "mish", "softplus", "relu6")


def _torch_nn_allowed():
    """A context in which a weights-only ``torch.load`` accepts the torch.nn module classes."""
    safe_globals = getattr(torch.serialization, "safe_globals", None)
    if safe_globals is None:  # torch < 2.5: only tensors and containers load weights-only
        return contextlib.nullcontext()
    classes, pending = [], [torch.nn.Module]
    while pending:
        cls = pending.pop()
        if cls.__module__.startswith("torch.nn.modules"):
            classes.append(cls)
        pending.extend(cls.__subclasses__())
    functions = [getattr(F, name) for name in _NN_FUNCTIONS if hasattr(F, name)]
    return safe_globals(list(dict.fromkeys(classes)) + functions)


def _refused_message(path, error):
    """Why a weights-only load refused ``path``, and the flag that loads it anyway."""
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
    if found:
        return (
            f"{path} needs {found.group(1)}, which is not part of torch.nn, to load, and "
            "unpickling it could run code from the file. If you trust the file, pass "
            "--trust-pickle"
        )
    reason = re.search(r"WeightsUnpickler error: *(\S.*)", str(error))
    return (
        f"cannot load {path}: a weights-only load cannot read it "
        f"({reason.group(1) if reason else 'it is not a model saved with torch.save'}). If it "
        "is a full pickle you trust, pass --trust-pickle"
    )


@contextlib.contextmanager
def _current_directory_importable():
    """The working directory at the END of sys.path while loading, so that model classes
    defined next to the user import, but a stray ``shlex.py`` there cannot shadow the
    standard library."""
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.append(cwd)
    try:
        yield
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


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
    """``torch.save`` the whole model (all or nothing: the old file stays if this fails)."""
    _write_atomically(path, lambda file: torch.save(model, file))


def save_folder(compressor, folder):
    """:func:`skid.nn.save_compressed` into ``folder`` (created if missing)."""
    from .nn import save_compressed

    try:
        save_compressed(compressor, folder)
    except (OSError, ImportError) as error:
        raise InputFileError(f"cannot write {folder}: {error}") from None


def write_json(data, path):
    """Write ``data`` as indented JSON (all or nothing)."""
    text = (json.dumps(data, indent=2) + "\n").encode()
    _write_atomically(path, lambda file: file.write(text))


def _write_atomically(path, write):
    """``write(file)`` into a new file next to ``path``, then rename it onto ``path``.

    A failure leaves no half-written file, and an existing ``path`` is replaced as a whole:
    other hard links to the old file keep their content. A symbolic link is written through.
    """
    target = path.resolve()
    temporary = target.with_name(f".{target.name}.{os.getpid()}.part")
    try:
        with open(temporary, "xb") as file:
            write(file)
        os.replace(temporary, target)
    except OSError as error:
        raise InputFileError(f"cannot write {path}: {error}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
