"""Model-preserving compression of torch networks with the interpolative decomposition."""

from ._compressor import NetworkCompressor

__all__ = ["NetworkCompressor"]
