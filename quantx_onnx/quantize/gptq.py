"""GPTQ (Frantar et al., 2022): quantize W column by column along K and spread each column's
rounding error over the not-yet-quantized columns through the inverse Hessian, so that the
layer's output X @ W (not the weights) stays close.

Details that matter at 3 bits:
- static groups: every group's scale and zero point are fixed from the original weights before
  the loop, so act-order (quantizing the most active input channels first) needs no
  permutation stored in the model: the order only changes which columns absorb the error.
- dampening: H += damp * mean(diag H) * I keeps the Cholesky factor well conditioned. At
  0.1 rather than the paper's 0.01 it also keeps the fit from leaning on directions the
  calibration text barely visits (SmolLM2 3-bit: -1% Wikipedia, -1.2% Lee held-out
  perplexity; docs/ACCURACY.md).
- blocked lazy updates: columns are processed in blocks of 128; the rest of W is updated once
  per block (as in the paper).
Torch is used for the linear algebra (calibration only; never at run time).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..format import QuantizedWeight, WeightFormat

DAMP = 0.1  # dampening, as a fraction of the Hessian's mean diagonal


def gptq_codes(
    w_nk: np.ndarray,
    H: np.ndarray,
    fmt: WeightFormat,
    scales: np.ndarray,
    zero_points: np.ndarray,
    *,
    damp: float = DAMP,
    act_order: bool = True,
    block: int = 128,
    codebook: np.ndarray | None = None,
) -> np.ndarray:
    """Codes [N, K] for fixed per-group scales/zero points, with GPTQ error compensation.

    w_nk: weights [N, K]; H: input Hessian [K, K] (any positive scaling). With a sorted
    ``codebook`` [1 or N, levels] the grid is non-uniform, w = s * codebook[row, q] (zero
    points unused): each column rounds to the nearest entry, and the error feedback is the
    same (GPTVQ-style error compensation for a 1-D codebook)."""
    import torch

    # Per-column work is small: more threads only add synchronisation (and on a loaded
    # machine, a lot of it).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _gptq_loop(
            torch, w_nk, H, fmt, scales, zero_points, damp, act_order, block, codebook
        )
    finally:
        torch.set_num_threads(threads)


def _rounder(torch, fmt, codebook, N):
    """round(w, s, z) -> (codes, dequantized values) for one column of every row."""
    if codebook is None:
        qmax = float(fmt.code_levels - 1)

        def uniform(w, s, z):
            q = torch.clamp(torch.round(w / s) + z, 0.0, qmax)
            return q, s * (q - z)

        return uniform
    cb = torch.from_numpy(
        np.broadcast_to(np.asarray(codebook, np.float32), (N, fmt.code_levels)).copy()
    )
    edges = 0.5 * (cb[:, 1:] + cb[:, :-1])
    rows = torch.arange(N)

    def nearest_entry(w, s, _z):
        q = (w[:, None] / s[:, None] > edges).sum(dim=1)
        return q.float(), s * cb[rows, q]

    return nearest_entry


def inverse_hessian_factor(torch, H: np.ndarray, damp: float = DAMP, act_order: bool = True):
    """(U, perm, dead): U the upper Cholesky factor of the dampened H^-1 in float64, whose row
    j holds the error-feedback coefficients of column j, over the inputs in the order ``perm``
    (act-order: largest Hessian diagonal first; else the natural order); ``dead`` marks the
    inputs the calibration never saw (zero diagonal, set to 1 before dampening)."""
    K = H.shape[0]
    Hm = torch.from_numpy(np.asarray(H, np.float64)).clone()
    dead = torch.diag(Hm) <= 0
    Hm[dead, dead] = 1.0
    Hm += damp * torch.diag(Hm).mean() * torch.eye(K, dtype=torch.float64)
    perm = torch.argsort(torch.diag(Hm), descending=True) if act_order else torch.arange(K)
    Hm = Hm[perm][:, perm]
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(Hm)), upper=True)
    return U, perm, dead


def _gptq_loop(torch, w_nk, H, fmt, scales, zero_points, damp, act_order, block, codebook):
    N, K = w_nk.shape
    # float64 for the factorisation, float32 for the updates
    Hinv, perm, dead = inverse_hessian_factor(torch, H, damp, act_order)
    Hinv = Hinv.float()
    inv_perm = torch.argsort(perm)

    W = torch.from_numpy(np.array(w_nk, np.float32))[:, perm]  # a private copy
    W[:, dead[perm]] = 0.0
    group_of = torch.from_numpy(np.arange(K) // fmt.group)[perm]
    # per column (permuted): scale and zero point of its group, as [K, N] rows for speed
    S = torch.from_numpy(np.asarray(scales, np.float32)).T[group_of].contiguous()
    Z = torch.from_numpy(np.asarray(zero_points, np.float32)).T[group_of].contiguous()
    quantize = _rounder(torch, fmt, codebook, N)
    Q = torch.zeros((K, N), dtype=torch.float32)
    Wt = W.T.contiguous()  # [K, N]: a column of W is a contiguous row here
    for i1 in range(0, K, block):
        i2 = min(i1 + block, K)
        W1 = Wt[i1:i2].clone()
        E1 = torch.empty_like(W1)
        Hb = Hinv[i1:i2, i1:i2]
        for j in range(i2 - i1):
            c = i1 + j
            w = W1[j]
            q, w_hat = quantize(w, S[c], Z[c])
            Q[c] = q
            err = (w - w_hat) / Hb[j, j]
            W1[j + 1 :] -= Hb[j, j + 1 :, None] * err[None, :]
            E1[j] = err
        Wt[i2:] -= Hinv[i1:i2, i2:].T @ E1
    return Q.T[:, inv_perm].numpy().astype(np.uint8)


def quantize_gptq(
    w_kn: np.ndarray,
    H: np.ndarray,
    fmt: WeightFormat,
    base: QuantizedWeight,
    **kwargs,
) -> QuantizedWeight:
    """GPTQ on top of `base`'s grid (its scales and zero points, e.g. from RTN or a clip
    search): only the codes change."""
    w_nk = np.ascontiguousarray(np.asarray(w_kn, np.float32).T)
    if base.codebook is not None:
        zero = np.zeros(base.scales.shape, np.float32)
        codes = gptq_codes(w_nk, H, fmt, base.scales, zero, codebook=base.codebook, **kwargs)
    else:
        codes = gptq_codes(w_nk, H, fmt, base.scales, base.effective_zero_points, **kwargs)
    return dataclasses.replace(base, codes=codes)


def output_error(w_kn: np.ndarray, w_hat_kn: np.ndarray, H: np.ndarray) -> float:
    """Relative error of the layer output over the calibration tokens:
    tr(dW^T H dW) / tr(W^T H W) (with H = sum of weighted x x^T)."""
    d = np.asarray(w_hat_kn, np.float64) - np.asarray(w_kn, np.float64)
    w = np.asarray(w_kn, np.float64)
    num = np.einsum("kn,kn->", d, H @ d)
    den = np.einsum("kn,kn->", w, H @ w)
    return float(num / max(den, 1e-30))
