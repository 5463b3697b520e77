"""Tapes: a block's recorded outputs, one entry per calibration batch, for block-wise replay.

On the host a tape holds the outputs themselves. With ``memory=`` each batch is a file of
plain tensor bytes behind a JSON header that describes the output's structure (tuples, lists,
dicts, NamedTuples, ``ModelOutput``s): nothing is pickled, and reading a file runs no code
from it. The classes a structure names are never imported: they are taken from the live
model's output (:func:`flatten` of the block's output on the example), so a tape whose
structure the model does not produce is foreign.

A tape is written into a fresh folder with an index (per file: size, CRC-32, structure)
written last, and renamed to its key once complete. :meth:`TapeStore.load` accepts a folder
only if its index and every file match, so a missing, truncated, damaged or foreign tape is
recorded again; the new recording replaces it, and an incomplete one never replaces anything.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
import zlib
from collections.abc import Mapping

import torch

from ._trace import map_tensors

__all__ = ["Recorder", "Tape", "TapeFile", "TapeStore", "flatten", "unflatten"]

FORMAT = "skid-tape"
VERSION = 1
INDEX = "index.json"
_SCALARS = (type(None), bool, int, float, str)


# ------------------------------------------------------------------------------ structures


def flatten(value):
    """``(tensors, structure, types)``: the tensors of ``value`` in order, a JSON-able
    description of where they sit, and the classes it names (by qualified name).

    A tensor appearing twice is stored once (the structure refers to it twice).
    """
    tensors, index, types = [], {}, {}

    def name_of(cls):
        name = f"{cls.__module__}.{cls.__qualname__}"
        types[name] = cls
        return name

    def walk(v):
        if isinstance(v, torch.Tensor):
            if id(v) not in index:
                index[id(v)] = len(tensors)
                tensors.append(v)
            return {"tensor": index[id(v)]}
        if isinstance(v, _SCALARS):
            return {"value": v}
        if isinstance(v, tuple) and hasattr(v, "_fields"):
            return {"named": name_of(type(v)), "items": [walk(x) for x in v]}
        if isinstance(v, (tuple, list)) and type(v) in (tuple, list):
            return {type(v).__name__: [walk(x) for x in v]}
        if isinstance(v, Mapping) and all(isinstance(k, _SCALARS) for k in v):
            items = [[k, walk(x)] for k, x in v.items()]
            if type(v) is dict:
                return {"dict": items}
            return {"mapping": name_of(type(v)), "items": items}
        raise TypeError(
            f"a block's output holds a {type(v).__name__}, which a tape cannot store: "
            "block outputs must be tensors in tuples, lists, dicts, NamedTuples or ModelOutputs "
            "(with memory=None the outputs stay in host memory as they are)."
        )

    return tensors, walk(value), types


def unflatten(structure, tensors, types):
    """The value :func:`flatten` described, its classes taken from ``types`` (KeyError for a
    class the live model's output does not have)."""

    def build(s):
        if "tensor" in s:
            return tensors[s["tensor"]]
        if "value" in s:
            return s["value"]
        if "named" in s:
            return types[s["named"]](*map(build, s["items"]))
        if "tuple" in s:
            return tuple(map(build, s["tuple"]))
        if "list" in s:
            return list(map(build, s["list"]))
        items = {k: build(x) for k, x in s["items" if "mapping" in s else "dict"]}
        return types[s["mapping"]](**items) if "mapping" in s else items

    return build(structure)


def _write(path, value) -> dict:
    """Write one output (tensors on the host); its index entry."""
    tensors, structure, _ = flatten(value)
    blobs, entries, offset = [], [], 0
    for t in tensors:
        t = t.detach().to("cpu").contiguous()
        blob = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        entries.append({"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
                        "offset": offset, "nbytes": len(blob)})
        blobs.append(blob)
        offset += len(blob)
    header = json.dumps({"structure": structure, "tensors": entries}).encode()
    data = len(header).to_bytes(8, "little") + header + b"".join(blobs)
    with open(path, "wb") as f:
        f.write(data)
    return {"name": os.path.basename(path), "size": len(data), "crc32": zlib.crc32(data),
            "structure": structure}


def _read(path, types, device):
    with open(path, "rb") as f:
        data = f.read()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    body = memoryview(data)[8 + n :]
    tensors = []
    for e in header["tensors"]:
        dtype = getattr(torch, e["dtype"])
        raw = body[e["offset"] : e["offset"] + e["nbytes"]]
        flat = (torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype) if e["nbytes"]
                else torch.empty(0, dtype=dtype))
        tensors.append(flat.reshape(e["shape"]).to(device))
    return unflatten(header["structure"], tensors, types)


# ----------------------------------------------------------------------------------- tapes


class TapeFile:
    """One batch of a stored tape: a file, read back with the live model's classes."""

    def __init__(self, path, types):
        self.path, self.types = path, types

    def read(self, device):
        return _read(self.path, self.types, device)


class Tape:
    """The cached outputs of one block, one entry per calibration batch: the outputs (host)
    or :class:`TapeFile` s. Replays read :meth:`current`, a copy the model may write into."""

    def __init__(self, outputs=None):
        self.outputs = outputs or []
        self.position = -1

    def rewind(self) -> None:
        self.position = -1

    def current(self, device):
        entry = self.outputs[self.position]
        if isinstance(entry, TapeFile):
            return entry.read(device)
        return map_tensors(entry, lambda t: t.to(device, copy=True))


class TapeStore:
    """Block outputs on disk, under ``memory=``'s folder, by content key (``memory.clear()``
    removes them with the statistics)."""

    def __init__(self, memory):
        backend = getattr(memory, "store_backend", None)
        location = getattr(backend, "location", None)
        self.root = None if location is None else os.path.join(location, "skid_block_outputs")

    def folder(self, key):
        return None if self.root is None or key is None else os.path.join(self.root, key)

    def load(self, key, n_batches: int, types=None):
        """The stored tape under ``key`` (a list of :class:`TapeFile`), or None when there is
        none or it is not whole: missing or resized files, a CRC mismatch, another format
        version or batch count, or a class the live model's output (``types``) lacks."""
        folder = self.folder(key)
        return None if folder is None else _verified(folder, n_batches, types or {})


def _verified(folder, n_batches, types):
    try:
        with open(os.path.join(folder, INDEX)) as f:
            index = json.load(f)
        files = index["files"]
        if (index.get("format"), index.get("version")) != (FORMAT, VERSION) or \
                len(files) != n_batches:
            return None
        for entry in files:
            path = os.path.join(folder, entry["name"])
            if os.path.getsize(path) != entry["size"]:
                return None
            with open(path, "rb") as f:
                if zlib.crc32(f.read()) != entry["crc32"]:
                    return None
            if not _names(entry["structure"]) <= types.keys():
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return [TapeFile(os.path.join(folder, e["name"]), types) for e in files]


def _names(structure) -> set:
    """The class names a structure refers to."""
    if isinstance(structure, list):
        return set().union(*map(_names, structure)) if structure else set()
    if not isinstance(structure, dict):
        return set()
    found = {structure[k] for k in ("named", "mapping") if k in structure}
    for k in ("items", "tuple", "list", "dict"):
        if k in structure:
            found |= _names(structure[k])
    return found


class Recorder:
    """Takes a block's output for each batch: kept on the host, or written into a new folder
    that :meth:`finish` renames to the tape's key (``folder`` None: host)."""

    def __init__(self, folder=None):
        self.final = folder
        self.folder = None if folder is None else f"{folder}.{os.getpid()}.{uuid.uuid4().hex}"
        if self.folder is not None:
            os.makedirs(self.folder)
        self.outputs, self.entries, self.types = [], [], {}

    def append(self, output) -> None:
        if self.folder is not None:
            try:
                self.types.update(flatten(output)[2])
            except TypeError:  # an object a tape cannot hold: this tape stays on the host
                self._to_host()
            else:
                path = os.path.join(self.folder, f"{len(self.outputs)}.tape")
                self.entries.append(_write(path, output))
                self.outputs.append(TapeFile(path, self.types))
                return
        self.outputs.append(map_tensors(output, lambda t: t.detach().to("cpu")))

    def _to_host(self) -> None:
        """Read back what was written and record on the host from now on (nothing stored)."""
        self.outputs = [entry.read("cpu") for entry in self.outputs]
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder = None

    def finish(self, n_batches: int):
        """The tape's entries once all ``n_batches`` are in (else None, and nothing kept).

        A complete recording replaces a tape under its key that is not whole (it would not
        load); a whole one (another process stored the same tape first) is used instead.
        """
        complete = len(self.outputs) == n_batches
        if self.folder is None:
            return self.outputs if complete else None
        if not complete:
            shutil.rmtree(self.folder, ignore_errors=True)
            return None
        with open(os.path.join(self.folder, INDEX), "w") as f:
            json.dump({"format": FORMAT, "version": VERSION, "files": self.entries}, f)
        stored = _verified(self.final, n_batches, self.types)
        if stored is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            return stored
        if os.path.exists(self.final):  # not whole: move it aside, then drop it
            aside = f"{self.final}.broken.{uuid.uuid4().hex}"
            try:
                os.replace(self.final, aside)
                shutil.rmtree(aside, ignore_errors=True)
            except OSError:
                pass
        try:
            os.replace(self.folder, self.final)
        except OSError:  # another process put its tape there in between
            stored = _verified(self.final, n_batches, self.types)
            if stored is not None:
                shutil.rmtree(self.folder, ignore_errors=True)
                return stored
            return [TapeFile(os.path.join(self.folder, e["name"]), self.types)
                    for e in self.entries]  # ours stays where it is, for this run
        return [TapeFile(os.path.join(self.final, e["name"]), self.types) for e in self.entries]
