"""Models, data and timing helpers shared by the benchmarks (not part of skid).

The trained digits CNN comes from ``tests/nn/digits.py`` (the one the tests use), so the
repository root is put on ``sys.path``: the benchmarks run as scripts from a checkout.
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from skid._demo import fit_classifier  # noqa: E402
from tests.nn.digits import DigitsData, digits_data, train_digits_cnn  # noqa: E402

__all__ = [
    "REPO",
    "DigitsData",
    "digits_data",
    "digits_images",
    "forward_pass",
    "make_digits_mlp",
    "make_vgg32",
    "median_time",
    "minor_faults",
    "peak_above_start",
    "peak_ratio",
    "print_table",
    "status_mib",
    "set_threads",
    "skid_modules",
    "steady_allocator",
    "stopwatch",
    "train_digits_cnn",
    "train_digits_mlp",
]


# ---------------------------------------------------------------------------------- models


def make_vgg32(channels=(32, 64, 128), hidden=256, n_classes=10, seed=0) -> nn.Module:
    """VGG-style CNN for 3×32×32 inputs, random init, eval mode.

    Per block two ``Conv3×3 → BN → ReLU`` then ``MaxPool2d(2)``; after the last block
    ``Flatten → Linear(c·4·4, hidden) → ReLU → Linear(hidden, n_classes)``. BatchNorm gets
    random running statistics so that eval-mode activations are not degenerate.
    """
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    layers, c_in = [], 3
    for c_out in channels:
        for c in (c_in, c_out):
            layers += [nn.Conv2d(c, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]
        layers.append(nn.MaxPool2d(2))
        c_in = c_out
    side = 32 // 2 ** len(channels)
    layers += [nn.Flatten(), nn.Linear(c_in * side * side, hidden), nn.ReLU(),
               nn.Linear(hidden, n_classes)]
    model = nn.Sequential(*layers)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(0.1 * torch.randn(n, generator=generator))
            module.running_var.copy_(0.5 + torch.rand(n, generator=generator))
    return model.eval()


def make_digits_mlp(hidden=(128, 64)) -> nn.Sequential:
    """MLP on the flattened 8×8 digits: 64 → 128 → ReLU → 64 → ReLU → 10."""
    sizes = (64, *hidden)
    layers = []
    for d_in, d_out in zip(sizes[:-1], sizes[1:], strict=True):
        layers += [nn.Linear(d_in, d_out), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(sizes[-1], 10))


def train_digits_mlp(seed=0, epochs=30) -> tuple[nn.Module, DigitsData]:
    """The MLP trained with Adam on the digits training split (a second or two on a CPU).

    Returns the model (eval mode) and the split, with inputs of shape (n, 1, 8, 8): flatten
    them with ``.flatten(1)``.
    """
    data = digits_data(seed)
    torch.manual_seed(seed)
    model = fit_classifier(
        make_digits_mlp(), data.X_train.flatten(1), data.y_train, epochs=epochs, batch_size=50,
        seed=seed,
    )
    return model, data


def digits_images(n, seed=0) -> torch.Tensor:
    """``n`` digit images (n, 1, 8, 8) in [0, 1]: the 1,797 digits drawn with replacement,
    plus a little noise so that repeated draws are not identical rows."""
    from sklearn.datasets import load_digits

    images = load_digits().images.astype(np.float32) / 16.0
    rng = np.random.default_rng(seed)
    picked = images[rng.integers(0, len(images), n)]
    picked += 0.01 * rng.standard_normal(picked.shape, dtype=np.float32)
    return torch.from_numpy(picked[:, None])


# --------------------------------------------------------------------------------- timing


def set_threads(threads) -> int:
    """Limit torch's intra-op threads and the BLAS pools (NumPy/SciPy) to ``threads`` when it
    is not 0; return torch's number of threads.

    On a loaded machine an idle-waiting second thread costs a scheduler time slice per call:
    a 64×64 triangular solve takes 8 ms with 2 OpenBLAS threads against 0.1 ms with one.
    """
    if threads:
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(threads)
        threadpool_limits(threads)
    return torch.get_num_threads()


def steady_allocator() -> bool:
    """Keep freed memory in the process (glibc only; True if set): blocks up to 32 MiB come
    from the heap and it is never trimmed, so a pass does not pay a page fault per 4 KiB of
    memory that the allocator gave back to the system after the last one.

    glibc hands a freed block back or keeps it depending on what else the process holds, so
    one run's rounds paid 40,000–70,000 minor faults per forward of the benchmark LLaMA
    (≈ 0.1 s of a 0.2–0.3 s pass) and another's none: single rounds moved by up to 30 %.
    """
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        # M_MMAP_THRESHOLD (-3): its largest value; M_TRIM_THRESHOLD (-1): 1 GiB
        return bool(libc.mallopt(-3, 32 << 20)) and bool(libc.mallopt(-1, 1 << 30))
    except (OSError, AttributeError):
        return False


def minor_faults() -> int:
    """Minor page faults of this process so far (0 where the platform does not count them)."""
    try:
        import resource
    except ImportError:
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def forward_pass(model, X, batch_size=256) -> None:
    """One plain inference pass over ``X`` in batches (eval, no_grad), outputs discarded."""
    model.eval()
    with torch.no_grad():
        for start in range(0, len(X), batch_size):
            model(X[start : start + batch_size])


def median_time(fn, rounds) -> float:
    """Median wall time of ``rounds`` calls of ``fn()``, in seconds."""
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@contextlib.contextmanager
def stopwatch(store: dict, key: str):
    """Add the wall time of the ``with`` body to ``store[key]``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        store[key] = store.get(key, 0.0) + time.perf_counter() - start


# --------------------------------------------------------------------------------- tables


def skid_modules() -> list:
    """skid's modules loaded in this process."""
    return [m for n, m in list(sys.modules.items()) if n.startswith("skid") and m is not None]


def replace_everywhere(module_name: str, attribute: str, wrap, modules=None) -> list:
    """Replace skid's ``module_name.attribute`` (a dotted path: ``Class.method`` too) by
    ``wrap(original)`` in its module and in every skid module that imported it by name
    (``modules``: :func:`skid_modules`, found here if not given: with transformers loaded,
    a scan of 3,750 modules, ≈ 0.7 ms); returns ``[(place, name, original)]`` to put back.
    None where the attribute is missing (a checkout without that step): nothing replaced,
    ``[]``."""
    import importlib

    owner = importlib.import_module(module_name)
    *path, name = attribute.split(".")
    for step in path:
        owner = getattr(owner, step)
    original = getattr(owner, name, None)
    if original is None:
        return []
    wrapped = wrap(original)
    places = [owner] + [m for m in (skid_modules() if modules is None else modules)
                        if m is not owner and getattr(m, name, None) is original]
    for place in places:
        setattr(place, name, wrapped)
    return [(place, name, original) for place in places]


def print_table(title, header, rows, formats) -> None:
    """Print a Markdown table: ``formats`` holds one format spec per column (``"s"``: text,
    left-aligned; ``".3f"``, ``"d"`` ...: numbers, right-aligned)."""
    cells = [[format(v, f) if not isinstance(v, str) else v for v, f in zip(row, formats,
                                                                          strict=True)]
             for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    print(f"\n{title}\n")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        padded = [c.ljust(w) if f == "s" else c.rjust(w)
                  for c, w, f in zip(row, widths, formats, strict=True)]
        print("| " + " | ".join(padded) + " |")
    sys.stdout.flush()


def status_mib(key: str) -> float:
    """A memory line of /proc/self/status (VmRSS, VmHWM), in MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(key)


def peak_above_start(fn) -> float:
    """Peak resident memory of ``fn()`` above the resident memory when it starts (MiB).

    Resets the kernel's high-water mark first (``/proc/self/clear_refs``, Linux): torch's CPU
    allocations are invisible to tracemalloc, not to the resident set.
    """
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    start = status_mib("VmRSS")
    fn()
    return status_mib("VmHWM") - start


# A call whose working memory fits in heap the process already holds (a smoke run's small
# model) raises no resident peak: 0 MiB, or a few pages. A ratio to such a peak says nothing.
PEAK_RESOLUTION_MIB = 1.0


def peak_ratio(peak: float, base: float):
    """``peak / base``, or ``"-"`` where the base peak is below ``PEAK_RESOLUTION_MIB``."""
    return peak / base if base >= PEAK_RESOLUTION_MIB else "-"
