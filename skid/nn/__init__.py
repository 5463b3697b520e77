"""Model-preserving compression of torch networks with the interpolative decomposition."""

from ._compressor import NetworkCompressor
from ._io import load_compressed, save_compressed

__all__ = ["NetworkCompressor", "load_compressed", "save_compressed"]
