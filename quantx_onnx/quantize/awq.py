"""AWQ-style activation-aware scaling (Lin et al., 2023): scale input channel k of W by
t_k = mean|x_k|^alpha before quantizing, so that the salient channels (large activations) get
finer steps, and divide the activation by t_k at run time. alpha is searched per matrix on the
layer's output error over the calibration tokens, not on weight error.

The node stores 1/t as its ``input_scale`` input (docs/FORMAT.md): A' = A * input_scale, and
W as seen by A is diag(input_scale) @ W_stored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from ..format import QuantizedWeight, dequantize
from .gptq import output_error

ALPHAS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def awq_quantize(
    w_kn: np.ndarray,
    abs_mean: np.ndarray,
    H: np.ndarray,
    quantize: Callable[[np.ndarray, np.ndarray], QuantizedWeight],
    alphas=ALPHAS,
    scale_dtype=np.float16,
) -> tuple[QuantizedWeight, float]:
    """Best (weight with input_scale, alpha) over `alphas`. `quantize(W', t)` applies the base
    grid (RTN, clip search, GPTQ...) to the scaled weight W' = diag(t) W (whose inputs are
    x / t: a Hessian-based base method uses diag(1/t) H diag(1/t))."""
    w = np.asarray(w_kn, np.float32)
    x = np.maximum(np.asarray(abs_mean, np.float64), 1e-8)
    best, best_err, best_alpha = None, np.inf, 0.0
    for alpha in alphas:
        t = x**alpha
        t = t / np.sqrt(t.max() * t.min())  # keep the scaled weights' range centred
        # the stored 1/t is what the kernel multiplies by: scale W by exactly its inverse
        inv = (1.0 / t).astype(scale_dtype).astype(np.float32)
        t = (1.0 / inv).astype(np.float32)
        q = quantize(w * t[:, None], t)
        q = dataclasses.replace(q, input_scale=inv) if alpha else q
        err = output_error(w, dequantize(q), H)
        if err < best_err:
            best, best_err, best_alpha = q, err, alpha
    return best, best_alpha
