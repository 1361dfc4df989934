"""Round-to-nearest quantization, asymmetric or symmetric, groups along K."""

from __future__ import annotations

import dataclasses

import numpy as np

from ..format import QuantizedWeight, WeightFormat, hierarchical_scales
from .grid import assign_codes, grouped, round_scales


def minmax_params(w_nk: np.ndarray, fmt: WeightFormat, symmetric: bool):
    """Ideal (unrounded) per-group scales and zero points of the plain RTN grid.

    Asymmetric: the group's [min, max] spans all 2**b levels, with an integer zero point so that
    0.0 is exactly representable. Symmetric: the value of largest magnitude maps to code 0
    (-2**(b-1) after the implicit zero point), so the scale's sign follows that value.
    """
    g = grouped(w_nk, fmt)
    levels = fmt.code_levels
    if symmetric:
        idx = np.abs(g).argmax(axis=2)
        peak = np.take_along_axis(g, idx[:, :, None], axis=2)[:, :, 0]
        scales = peak / -(levels // 2)
        return scales, None
    lo = np.minimum(g.min(axis=2), 0.0)
    hi = np.maximum(g.max(axis=2), 0.0)
    scales = (hi - lo) / (levels - 1)
    return scales, lo


def zero_points_for(lo: np.ndarray, scales: np.ndarray, fmt: WeightFormat) -> np.ndarray:
    return np.clip(np.rint(-lo / scales), 0, fmt.code_levels - 1).astype(np.uint8)


def split_hierarchical(scales: np.ndarray, fmt: WeightFormat, dtype):
    """Encode positive per-group scales as super_scale * (sub + 1), sub < 2**scale_bits.

    The super-scale is the largest scale of its super-block over 2**scale_bits, so the largest
    group keeps its exact scale and the others round to the nearest sub-scale step."""
    G, sg, top = fmt.n_groups, fmt.super_group, 1 << fmt.scale_bits
    pad = fmt.n_super * sg - G
    s = np.pad(np.abs(scales), ((0, 0), (0, pad)))
    sup = s.reshape(fmt.N, fmt.n_super, sg).max(axis=2) / top
    sup = round_scales(sup, dtype)
    per_group = np.repeat(sup, sg, axis=1)[:, :G]
    sub = np.clip(np.rint(np.abs(scales) / per_group) - 1, 0, top - 1).astype(np.uint8)
    return sup, sub, hierarchical_scales(sup, sub, sg)


def quantize_rtn(
    w: np.ndarray, fmt: WeightFormat, symmetric: bool = False, scale_dtype=np.float16
) -> QuantizedWeight:
    """RTN-quantize ``w[K, N]`` (any float dtype, possibly a memory-mapped or transposed view)
    into ``fmt``, a chunk of columns at a time so that temporaries stay small."""
    parts = []
    for c in range(0, fmt.N, RTN_CHUNK):
        c1 = min(c + RTN_CHUNK, fmt.N)
        w_nk = np.ascontiguousarray(np.asarray(w[:, c:c1], np.float32).T)
        sub = dataclasses.replace(fmt, N=c1 - c)
        scales, lo = minmax_params(w_nk, sub, symmetric)
        parts.append(finish_uniform(w_nk, sub, scales, lo, symmetric, scale_dtype))
    return join_columns(parts, fmt) if len(parts) > 1 else parts[0]


RTN_CHUNK = 4096


def join_columns(parts: list[QuantizedWeight], fmt: WeightFormat) -> QuantizedWeight:
    """One weight from weights of consecutive column ranges."""

    def cat(name):
        arrays = [getattr(p, name) for p in parts]
        return None if arrays[0] is None else np.concatenate(arrays)

    return QuantizedWeight(
        fmt,
        cat("codes"),
        cat("scales"),
        cat("zero_points"),
        cat("super_scales"),
        cat("sub_scales"),
        scale_dtype=parts[0].scale_dtype,
    )


def finish_uniform(w_nk, fmt, scales, lo, symmetric, scale_dtype) -> QuantizedWeight:
    """Round ideal scales to the stored form, then derive zero points and codes from them."""
    super_scales = sub = None
    if fmt.hierarchical:
        sign = np.where(scales < 0, -1.0, 1.0)
        super_scales, sub, eff = split_hierarchical(scales, fmt, scale_dtype)
        if symmetric and np.any(sign < 0):
            raise ValueError("hierarchical scales are unsigned; use asymmetric quantization")
        scales = eff
    else:
        scales = round_scales(scales, scale_dtype)
    if symmetric:
        zp = np.full(scales.shape, fmt.code_levels // 2, np.uint8)
        zero_points = None
    else:
        zp = zero_points_for(lo, scales, fmt)
        zero_points = zp
    codes = assign_codes(w_nk, fmt, scales, zp)
    return QuantizedWeight(
        fmt=fmt,
        codes=codes,
        scales=scales.astype(np.float32),
        zero_points=zero_points,
        super_scales=super_scales,
        sub_scales=sub,
        scale_dtype=scale_dtype,
    )
