"""Deployment targets: which packed layout and compute path a target's kernels read directly.

TILE16 serves every SIMD target: 16 columns x 4 consecutive k per 64-lane block is the int32
lane order of x86 vpdpbusd (AVX-512: one zmm; AVX2: two ymm halves) and of ARM sdot (four q
registers), and its bit planes unpack with shifts, masks and byte shuffles on all of them.
ROW is the portable layout for hosts without a QuantX SIMD kernel. docs/FORMAT.md says more.
"""

from __future__ import annotations

import dataclasses

from .errors import InputError
from .format import AccuracyLevel, Layout


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    layout: Layout
    accuracy_level: AccuracyLevel  # default compute path
    kernels: str  # kernel table that reads this layout natively
    description: str


TARGETS = {
    t.name: t
    for t in (
        Target(
            "generic",
            Layout.ROW,
            AccuracyLevel.FLOAT,
            "ref",
            "portable row-major bit streams; any CPU, reference speed",
        ),
        Target(
            "x86-avx2",
            Layout.TILE16,
            AccuracyLevel.INT8,
            "avx2",
            "x86 with AVX2/FMA (Haswell+, Zen 1+): vpmaddubsw int8 dots",
        ),
        Target(
            "x86-avx512",
            Layout.TILE16,
            AccuracyLevel.INT8,
            "avx512",
            "x86 with AVX-512 BW/VL/VNNI (Ice Lake+, Zen 4+): vpdpbusd int8 dots",
        ),
        Target(
            "arm64-neon",
            Layout.TILE16,
            AccuracyLevel.INT8,
            "neon",
            "ARMv8-A NEON without dot product: smull/sadalp int8 dots",
        ),
        Target(
            "arm64-dotprod",
            Layout.TILE16,
            AccuracyLevel.INT8,
            "neon-dotprod",
            "ARMv8.2-A with dot product (most phones since 2018): sdot int8 dots",
        ),
    )
}

_BY_KERNELS = {t.kernels: t for t in TARGETS.values()}


def resolve_target(name: str) -> Target:
    """A target by name; ``auto`` is the machine this runs on (its best kernel table)."""
    if name == "auto":
        from .runtime import kernel_name

        return _BY_KERNELS.get(kernel_name(), TARGETS["generic"])
    if name not in TARGETS:
        raise InputError(f"--target {name!r}: unknown (choose auto, {', '.join(TARGETS)})")
    return TARGETS[name]
