"""Model-preserving compression of torch networks with the interpolative decomposition."""

from ._compressor import NetworkCompressor
from ._io import load_compressed, save_compressed
from ._kinds import register_layer_kind
from ._mha import PrunedMultiheadAttention

__all__ = ["NetworkCompressor", "PrunedMultiheadAttention", "load_compressed",
           "register_layer_kind", "save_compressed"]
