"""skid: the interpolative decomposition, and model-preserving compression of torch networks.

``import skid`` stays light: the torch half (:class:`NetworkCompressor`, :mod:`skid.metrics`,
:mod:`skid.model_selection`) is imported on first use.
"""

import importlib

from .decomposition import InterpolativeDecomposition, interp_decomp
from .exceptions import InvalidParameterError, NotFittedError, NotPrunableError

__version__ = "0.1.0"

__all__ = [
    "InterpolativeDecomposition",
    "InvalidParameterError",
    "NetworkCompressor",
    "NotFittedError",
    "NotPrunableError",
    "interp_decomp",
    "metrics",
    "model_selection",
]

_LAZY = {
    "NetworkCompressor": ("skid.nn", "NetworkCompressor"),
    "metrics": ("skid.metrics", None),
    "model_selection": ("skid.model_selection", None),
}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'skid' has no attribute {name!r}")
    module_name, attr = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
