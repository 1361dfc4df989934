"""Quantization algorithms: each turns a float weight W[K, N] into a QuantizedWeight."""
