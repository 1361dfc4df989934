"""Non-uniform grids: W[k, n] = s[n, group] * c[row, q], with a codebook of 2^bits entries per
output column (``per_row``) or one per tensor, fit by importance-weighted Lloyd iterations
(k-means in one dimension) on the group-normalised weights.

Each round: normalise every group by its scale, fit the codebook to the normalised weights
(weights = input-channel importance, the Hessian diagonal), assign the nearest entries, then
refit every group's scale by weighted least squares (it may turn negative, which mirrors a
skewed codebook for that group). Scales and codebook end rounded to the stored dtype.
"""

from __future__ import annotations

import numpy as np

from ..format import QuantizedWeight, WeightFormat
from .grid import grouped, round_scales, ungrouped


def _lloyd(u: np.ndarray, w: np.ndarray, levels: int, iters: int, init: np.ndarray) -> np.ndarray:
    """Weighted 1-D k-means of the values u (rows independent): centroids [rows, levels]."""
    c = init.copy()
    for _ in range(iters):
        edges = 0.5 * (c[:, 1:] + c[:, :-1])  # c stays sorted: nearest = bucket by midpoints
        idx = np.sum(u[:, :, None] > edges[:, None, :], axis=2)
        for j in range(levels):
            m = (idx == j) * w
            tot = m.sum(axis=1)
            has = tot > 0
            c[has, j] = (m * u).sum(axis=1)[has] / tot[has]
        c = np.sort(c, axis=1)
    return c


def quantize_codebook(
    w_kn: np.ndarray,
    fmt: WeightFormat,
    importance: np.ndarray | None = None,
    per_row: bool = True,
    rounds: int = 3,
    lloyd_iters: int = 8,
    scale_dtype=np.float16,
) -> QuantizedWeight:
    w_nk = np.ascontiguousarray(np.asarray(w_kn, np.float32).T)
    N, K = w_nk.shape
    levels = fmt.code_levels
    g = grouped(w_nk, fmt)  # [N, G, group]
    imp = np.ones(K, np.float32) if importance is None else np.asarray(importance, np.float32)
    imp_g = grouped(np.broadcast_to(imp, (N, K)).copy(), fmt)
    if fmt.K % fmt.group:  # edge padding of a partial last group carries no weight
        imp_g[:, -1, fmt.K - (fmt.n_groups - 1) * fmt.group :] = 0.0
    scales = np.abs(g).max(axis=2)
    scales = np.where(scales > 0, scales, 1.0)
    init = np.linspace(-1.0, 1.0, levels, dtype=np.float32)
    rows = N if per_row else 1
    codebook = np.tile(init, (rows, 1))
    for _ in range(rounds):
        u = g / scales[:, :, None]
        uu = u.reshape(rows, -1)
        ww = np.broadcast_to(imp_g, g.shape).reshape(rows, -1)
        codebook = _lloyd(uu, ww, levels, lloyd_iters, codebook)
        cb_n = codebook if per_row else np.repeat(codebook, N, axis=0)
        edges = 0.5 * (cb_n[:, 1:] + cb_n[:, :-1])
        q = np.sum(u.reshape(N, -1)[:, :, None] > edges[:, None, :], axis=2).reshape(g.shape)
        vals = np.take_along_axis(cb_n[:, None, :], q.reshape(N, -1)[:, None, :], axis=2)
        vals = vals.reshape(g.shape)
        num = (imp_g * g * vals).sum(axis=2)
        den = (imp_g * vals * vals).sum(axis=2)
        scales = np.where(den > 0, num / np.maximum(den, 1e-30), scales)
        scales = np.where(np.abs(scales) > 0, scales, 1.0)
    codebook = codebook.astype(scale_dtype).astype(np.float32)
    scales = round_scales(scales, scale_dtype)
    # final assignment against the stored codebook and scales
    cb_n = codebook if per_row else np.repeat(codebook, N, axis=0)
    target = g / scales[:, :, None]
    codes = np.abs(target.reshape(N, -1)[:, :, None] - cb_n[:, None, :]).argmin(axis=2)
    codes = ungrouped(codes.reshape(g.shape).astype(np.uint8), fmt)
    return QuantizedWeight(
        fmt, codes, scales.astype(np.float32), codebook=codebook, scale_dtype=scale_dtype
    )
