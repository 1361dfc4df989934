"""Range (clipping) search per group: shrink each group's [min, max] by the factor that
minimises the (optionally importance-weighted) squared error of its weights.

Data-free it weights every weight alike; with calibration, `importance[k]` = the Hessian
diagonal (mean x_k^2) weights each input channel by how much it moves the layer's output.
"""

from __future__ import annotations

import numpy as np

from ..format import WeightFormat
from .grid import grouped, round_scales

CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6)


def clip_search(
    w_nk: np.ndarray,
    fmt: WeightFormat,
    importance: np.ndarray | None = None,
    grid=CLIP_GRID,
    scale_dtype=np.float16,
):
    """Ideal (scales, lo) per group [N, G] for the asymmetric grid, as rtn.minmax_params."""
    g = grouped(w_nk, fmt)  # [N, G, group]
    N, G, L = g.shape
    if importance is None:
        imp = np.ones((G, L), np.float32)
    else:
        pad = G * L - fmt.K
        imp = np.pad(np.asarray(importance, np.float32), (0, pad)).reshape(G, L)
    if fmt.K % L:  # the edge padding of a partial last group must not count
        imp = imp.copy()
        imp[-1, fmt.K - (G - 1) * L :] = 0.0
    qmax = fmt.code_levels - 1
    hi0 = np.maximum(g.max(axis=2), 0.0)
    lo0 = np.minimum(g.min(axis=2), 0.0)
    best_err = best_s = best_lo = None
    for c in grid:
        hi, lo = hi0 * c, lo0 * c
        s = round_scales((hi - lo) / qmax, scale_dtype)
        z = np.clip(np.rint(-lo / s), 0, qmax)
        q = np.clip(np.rint(g / s[:, :, None]) + z[:, :, None], 0, qmax)
        err = (np.square(s[:, :, None] * (q - z[:, :, None]) - g) * imp[None]).sum(axis=2)
        if best_err is None:
            best_err, best_s, best_lo = err, (hi - lo) / qmax, lo
        else:
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best_s = np.where(better, (hi - lo) / qmax, best_s)
            best_lo = np.where(better, lo, best_lo)
    return best_s, best_lo
