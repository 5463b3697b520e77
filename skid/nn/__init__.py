"""Model-preserving compression of torch networks with the interpolative decomposition."""
