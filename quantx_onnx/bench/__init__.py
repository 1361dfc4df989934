"""Benchmarks: kernels against ORT MatMulNBits and fp32 MatMul; whole-model decode."""
