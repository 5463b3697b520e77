"""Model-preserving compression of torch networks with the interpolative decomposition."""

from ._compressor import NetworkCompressor
from ._kinds import register_layer_kind

__all__ = ["NetworkCompressor", "register_layer_kind"]
