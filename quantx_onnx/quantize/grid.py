"""Shared helpers of the uniform grid: group views of a weight and code assignment."""

from __future__ import annotations

import numpy as np

from ..format import QuantizedWeight, WeightFormat


def grouped(w_nk: np.ndarray, fmt: WeightFormat) -> np.ndarray:
    """View ``w[N, K]`` as ``[N, G, group]``; a partial last group is edge-padded, so the padding
    never changes a group's min, max or absmax."""
    pad = fmt.n_groups * fmt.group - fmt.K
    if pad:
        w_nk = np.pad(w_nk, ((0, 0), (0, pad)), mode="edge")
    return w_nk.reshape(fmt.N, fmt.n_groups, fmt.group)


def ungrouped(x: np.ndarray, fmt: WeightFormat) -> np.ndarray:
    """Inverse of :func:`grouped` (drops padding)."""
    return x.reshape(fmt.N, fmt.n_groups * fmt.group)[:, : fmt.K]


def round_scales(scales: np.ndarray, dtype) -> np.ndarray:
    """Round scales to the stored dtype; keep them nonzero so codes stay defined."""
    s = np.asarray(scales, np.float32)
    tiny = np.finfo(np.float16).tiny if dtype == np.float16 else np.finfo(np.float32).tiny
    s = np.where(np.abs(s) < tiny, np.where(s < 0, -tiny, tiny), s)
    return s.astype(dtype).astype(np.float32)


def assign_codes(w_nk, fmt: WeightFormat, scales, zero_points) -> np.ndarray:
    """Nearest codes for fixed per-group scales and zero points: clip(round(w/s) + z)."""
    g = grouped(w_nk, fmt)
    q = np.rint(g / scales[:, :, None]) + zero_points[:, :, None].astype(np.float32)
    q = np.clip(q, 0, fmt.code_levels - 1).astype(np.uint8)
    return ungrouped(q, fmt)


def check_finite(w: np.ndarray, name: str, chunk: int = 4096) -> None:
    """Refuse NaN/Inf weights (checked a chunk of columns at a time)."""
    bad = 0
    for c in range(0, w.shape[-1], chunk):
        part = w[..., c : c + chunk]
        bad += int(part.size - np.count_nonzero(np.isfinite(part)))
    if bad:
        raise ValueError(f"weight {name!r} contains {bad} NaN/Inf values; refusing to quantize")


def weight_of(q: QuantizedWeight) -> np.ndarray:
    """Dequantized ``W[N, K]`` (column-major view of format.dequantize, without input scale)."""
    f = q.fmt
    gk = np.arange(f.K) // f.group
    return q.scales[:, gk] * (q.codes.astype(np.float32) - q.effective_zero_points[:, gk])
