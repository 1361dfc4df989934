"""Numpy reference of the QuantX weight format: the executable form of docs/FORMAT.md.

Everything a QuantX node stores about one weight matrix ``W[K, N]`` (``Y = A @ W``) is described
here twice: logically, as a :class:`QuantizedWeight` (codes, scales, zero points, ... indexed by
output column ``n`` and input row ``k``), and physically, as the packed tensors the node carries
(:func:`pack` / :func:`unpack`). :func:`dequantize` turns either into ``float32 W[K, N]``. These
functions are the oracle of every test and every C++ kernel: if a kernel disagrees with them, the
kernel is wrong.

Packed tensor names (the node's optional inputs, in :data:`TENSOR_ORDER`):
``B`` codes, ``scales``, ``zero_points``, ``sub_scales``, ``codebook``, ``input_scale``.
"""

from __future__ import annotations

import dataclasses
import enum

import numpy as np

from . import rotation

DOMAIN = "com.quantx"
OP_MATMUL = "QxMatMul"
OP_GATHER = "QxGather"
OP_VERSION = 1

SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)
K_ALIGN = 16  # every group is stored padded to a multiple of 16 k (one TILE16 super-block)
TILE_N = 16  # columns per TILE16 tile
MAX_GROUP = 4096

# Packed weight tensors in node-input order (after the activation input).
TENSOR_ORDER = ("B", "scales", "zero_points", "sub_scales", "codebook", "input_scale")


class FormatError(ValueError):
    """A packed weight or its attributes break the format rules."""


class Layout(enum.IntEnum):
    """Physical order of the codes (node attribute ``layout``)."""

    ROW = 0  # generic: one LSB-first bitstream per output column and group
    TILE16 = 1  # SIMD: 16-column tiles, k4-interleaved lanes, bit planes (see docs/FORMAT.md)


class AccuracyLevel(enum.IntEnum):
    """Compute path (node attribute ``accuracy_level``; ORT's MatMulNBits numbering)."""

    FLOAT = 0  # float activations, fp32 accumulation (levels 1..3 mean the same)
    INT8 = 4  # activations quantized to int8 per block at run time, integer dot products


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _round_up(a: int, b: int) -> int:
    return _ceil_div(a, b) * b


@dataclasses.dataclass(frozen=True)
class WeightFormat:
    """What a node's attributes say about its packed weight.

    ``group_size == 0`` means one group per output column (per-channel). ``scale_bits > 0`` selects
    hierarchical scales: ``scale = super_scale * (sub_scale + 1)`` with an unsigned
    ``scale_bits``-bit ``sub_scale`` per group and one float ``super_scale`` per ``super_group``
    consecutive groups.
    """

    K: int
    N: int
    bits: int
    group_size: int = 64
    layout: Layout = Layout.TILE16
    scale_bits: int = 0
    super_group: int = 0
    rotate: int = 0  # 1: activations rotated by Q, codes hold Q^T W (quantx_onnx/rotation.py)

    def __post_init__(self):
        object.__setattr__(self, "layout", Layout(self.layout))
        self.validate()

    def validate(self) -> None:
        if self.K < 1 or self.N < 1:
            raise FormatError(f"K and N must be >= 1, got K={self.K} N={self.N}")
        if self.bits not in SUPPORTED_BITS:
            raise FormatError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        g = self.group_size
        if g != 0 and (g % K_ALIGN or not K_ALIGN <= g <= MAX_GROUP):
            raise FormatError(
                f"group_size must be 0 (per-channel) or a multiple of {K_ALIGN} in "
                f"[{K_ALIGN}, {MAX_GROUP}], got {g}"
            )
        if self.scale_bits:
            if not 2 <= self.scale_bits <= 8:
                raise FormatError(f"scale_bits must be 0 or in [2, 8], got {self.scale_bits}")
            if self.super_group < 2:
                raise FormatError(
                    f"hierarchical scales need super_group >= 2, got {self.super_group}"
                )
        elif self.super_group:
            raise FormatError("super_group is only meaningful with scale_bits > 0")
        if self.rotate not in (0, 1):
            raise FormatError(f"rotate must be 0 or 1, got {self.rotate}")
        if self.rotate and not rotation.supported(self.K):
            raise FormatError(f"rotate = 1 needs K = 12^a * 2^b, got K={self.K}")

    # --- derived sizes -----------------------------------------------------------------------
    @property
    def group(self) -> int:
        """Effective group length along K."""
        return self.group_size or self.K

    @property
    def n_groups(self) -> int:
        return _ceil_div(self.K, self.group)

    @property
    def n_super(self) -> int:
        return _ceil_div(self.n_groups, self.super_group) if self.scale_bits else 0

    @property
    def hierarchical(self) -> bool:
        return self.scale_bits > 0

    def group_length(self, j: int) -> int:
        return min(self.group, self.K - j * self.group)

    def stored_length(self, j: int) -> int:
        """Codes stored for group j: its length rounded up to a multiple of 16."""
        return _round_up(self.group_length(j), K_ALIGN)

    @property
    def k_stored(self) -> int:
        """Sum of stored group lengths: the padded K of the packed codes."""
        last = self.n_groups - 1
        return last * _round_up(self.group, K_ALIGN) + self.stored_length(last)

    @property
    def n_tiles(self) -> int:
        return _ceil_div(self.N, TILE_N)

    @property
    def code_levels(self) -> int:
        return 1 << self.bits

    def attributes(self) -> dict[str, int]:
        attrs = {
            "K": self.K,
            "N": self.N,
            "bits": self.bits,
            "group_size": self.group_size,
            "layout": int(self.layout),
        }
        if self.scale_bits:
            attrs.update(scale_bits=self.scale_bits, super_group=self.super_group)
        if self.rotate:
            attrs["rotate"] = self.rotate
        return attrs

    @classmethod
    def from_attributes(cls, attrs: dict) -> WeightFormat:
        keys = ("K", "N", "bits", "group_size", "layout", "scale_bits", "super_group", "rotate")
        return cls(**{k: int(attrs[k]) for k in keys if k in attrs})

    def with_layout(self, layout: Layout) -> WeightFormat:
        return dataclasses.replace(self, layout=Layout(layout))

    # --- expected packed shapes ----------------------------------------------------------------
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Shape of every packed tensor this format stores (codebook/input_scale excluded)."""
        G, b = self.n_groups, self.bits
        n_scales = self.n_super if self.hierarchical else G
        if self.layout == Layout.ROW:
            shapes = {
                "B": (self.N, G, _round_up(self.group, K_ALIGN) * b // 8),
                "scales": (self.N, n_scales),
                "zero_points": (self.N, _ceil_div(G * b, 8)),
            }
            if self.hierarchical:
                shapes["sub_scales"] = (self.N, _ceil_div(G * self.scale_bits, 8))
        else:
            T = self.n_tiles
            shapes = {
                "B": (T, self.k_stored // K_ALIGN, 32 * b),
                "scales": (T, n_scales, TILE_N),
                "zero_points": (T, G, 2 * b),
            }
            if self.hierarchical:
                shapes["sub_scales"] = (T, G, 2 * self.scale_bits)
        return shapes


@dataclasses.dataclass
class QuantizedWeight:
    """Logical (layout-free) content of a quantized weight ``W[K, N]``.

    codes[n, k] in [0, 2**bits); scales[n, j] are the effective per-group scales exactly as the
    kernel will use them (already rounded to the stored dtype; for hierarchical formats they equal
    ``super_scales[n, j // super_group] * (sub_scales[n, j] + 1)``). ``zero_points is None`` means
    symmetric (z = 2**(bits-1)). With a ``codebook`` the value is ``scale * codebook[row, q]``
    and there are no zero points. ``input_scale[k]`` multiplies activation channel k.
    """

    fmt: WeightFormat
    codes: np.ndarray  # uint8 [N, K]
    scales: np.ndarray  # float32 [N, G] effective
    zero_points: np.ndarray | None = None  # uint8 [N, G]
    super_scales: np.ndarray | None = None  # float32 [N, SG]
    sub_scales: np.ndarray | None = None  # uint8 [N, G]
    codebook: np.ndarray | None = None  # float32 [R, 2**bits], R in {1, N}
    input_scale: np.ndarray | None = None  # float32 [K]
    scale_dtype: type = np.float16

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        f = self.fmt
        G = f.n_groups
        _check_shape("codes", self.codes, (f.N, f.K), np.uint8)
        if self.codes.size and int(self.codes.max()) >= f.code_levels:
            raise FormatError(f"codes exceed {f.bits} bits")
        _check_shape("scales", self.scales, (f.N, G))
        if not np.all(np.isfinite(self.scales)):
            raise FormatError("scales contain NaN or Inf")
        if self.zero_points is not None:
            _check_shape("zero_points", self.zero_points, (f.N, G), np.uint8)
            if int(self.zero_points.max(initial=0)) >= f.code_levels:
                raise FormatError(f"zero_points exceed {f.bits} bits")
            if self.codebook is not None:
                raise FormatError("a codebook weight has no zero points")
        if f.hierarchical:
            if self.super_scales is None or self.sub_scales is None:
                raise FormatError("hierarchical format needs super_scales and sub_scales")
            _check_shape("super_scales", self.super_scales, (f.N, f.n_super))
            _check_shape("sub_scales", self.sub_scales, (f.N, G), np.uint8)
            if int(self.sub_scales.max(initial=0)) >= 1 << f.scale_bits:
                raise FormatError(f"sub_scales exceed {f.scale_bits} bits")
            expect = hierarchical_scales(self.super_scales, self.sub_scales, f.super_group)
            if not np.array_equal(expect, self.scales):
                raise FormatError("scales disagree with super_scales * (sub_scales + 1)")
        elif self.super_scales is not None or self.sub_scales is not None:
            raise FormatError("sub/super scales given for a non-hierarchical format")
        if self.codebook is not None:
            cb = self.codebook
            if cb.ndim != 2 or cb.shape[1] != f.code_levels or cb.shape[0] not in (1, f.N):
                raise FormatError(
                    f"codebook must have shape [1 or N={f.N}, {f.code_levels}], got {cb.shape}"
                )
            # like the scales, the codebook holds exactly what will be stored
            if not np.array_equal(cb.astype(self.scale_dtype).astype(np.float32), cb):
                raise FormatError(f"codebook values are not exact {np.dtype(self.scale_dtype)}")
        if self.input_scale is not None:
            _check_shape("input_scale", self.input_scale, (f.K,))
            s = self.input_scale
            if not np.array_equal(s.astype(self.scale_dtype).astype(np.float32), s):
                raise FormatError(f"input_scale values are not exact {np.dtype(self.scale_dtype)}")

    @property
    def effective_zero_points(self) -> np.ndarray:
        if self.zero_points is not None:
            return self.zero_points
        return np.full(self.scales.shape, 1 << (self.fmt.bits - 1), np.uint8)


def _check_shape(name, arr, shape, dtype=None):
    if arr is None or tuple(arr.shape) != tuple(shape):
        got = None if arr is None else tuple(arr.shape)
        raise FormatError(f"{name}: expected shape {tuple(shape)}, got {got}")
    if dtype is not None and arr.dtype != dtype:
        raise FormatError(f"{name}: expected dtype {np.dtype(dtype)}, got {arr.dtype}")


def hierarchical_scales(super_scales, sub_scales, super_group):
    """Effective scales of a hierarchical format: super[n, j // super_group] * (sub[n, j] + 1)."""
    G = sub_scales.shape[1]
    sup = np.repeat(super_scales.astype(np.float32), super_group, axis=1)[:, :G]
    return (sup * (sub_scales.astype(np.float32) + 1.0)).astype(np.float32)


# --- dequantization ----------------------------------------------------------------------------
def dequantize(q: QuantizedWeight | dict, fmt: WeightFormat | None = None) -> np.ndarray:
    """Return ``float32 W[K, N]`` for a logical weight or a dict of packed tensors: the matrix
    the node multiplies its (unscaled, unrotated) activations by."""
    if not isinstance(q, QuantizedWeight):
        q = unpack(q, fmt)
    w = stored_weight(q)
    if q.fmt.rotate:  # A @ W = (A Q) @ W'
        w = rotation.unrotate_weight(w)
    if q.input_scale is not None:
        # A' = A * input_scale, so W as seen by the original A is diag(input_scale) @ W.
        w = w * q.input_scale.astype(np.float32)[:, None]
    return np.ascontiguousarray(w, dtype=np.float32)


def stored_weight(q: QuantizedWeight) -> np.ndarray:
    """``float32 W'[K, N]`` as the codes decode it: before the input scale and the rotation."""
    f = q.fmt
    group_of_k = np.arange(f.K) // f.group
    scale_nk = q.scales[:, group_of_k]  # [N, K]
    if q.codebook is not None:
        cb = q.codebook.astype(np.float32)
        rows = np.arange(f.N) if cb.shape[0] == f.N else np.zeros(f.N, np.int64)
        values = cb[rows[:, None], q.codes]  # [N, K]
    else:
        zp = q.effective_zero_points.astype(np.float32)[:, group_of_k]
        values = q.codes.astype(np.float32) - zp
    return np.ascontiguousarray((scale_nk * values).T, dtype=np.float32)


# --- bit streams -------------------------------------------------------------------------------
def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack the last axis of ``values`` (each < 2**bits) into an LSB-first byte stream.

    Value i occupies bits [i*bits, (i+1)*bits) of the stream; bit t of the stream is bit t % 8 of
    byte t // 8. The stream is zero-padded to whole bytes.
    """
    v = np.asarray(values, dtype=np.uint8)
    n = v.shape[-1]
    planes = (v[..., :, None] >> np.arange(bits, dtype=np.uint8)) & 1
    stream = planes.reshape(*v.shape[:-1], n * bits)
    pad = (-stream.shape[-1]) % 8
    if pad:
        stream = np.concatenate([stream, np.zeros((*v.shape[:-1], pad), np.uint8)], axis=-1)
    return np.packbits(stream, axis=-1, bitorder="little")


def unpack_bits(data: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: the first ``count`` values of each stream on the last axis."""
    stream = np.unpackbits(np.asarray(data, np.uint8), axis=-1, bitorder="little")
    stream = stream[..., : count * bits].reshape(*data.shape[:-1], count, bits)
    return (
        (stream << np.arange(bits, dtype=np.uint8)).sum(axis=-1, dtype=np.uint16).astype(np.uint8)
    )


# --- K padding: groups stored as multiples of 16 -----------------------------------------------
def _stored_k_index(f: WeightFormat) -> np.ndarray:
    """For each stored k position (0..k_stored-1), the source k, or K for padding."""
    idx = []
    for j in range(f.n_groups):
        start, length = j * f.group, f.group_length(j)
        col = np.full(f.stored_length(j), f.K, np.int64)
        col[:length] = np.arange(start, start + length)
        idx.append(col)
    return np.concatenate(idx)


def _pad_columns(a: np.ndarray, rows: int) -> np.ndarray:
    """Zero-pad axis 0 of ``a`` to ``rows`` rows."""
    if a.shape[0] == rows:
        return a
    pad = np.zeros((rows - a.shape[0], *a.shape[1:]), a.dtype)
    return np.concatenate([a, pad], axis=0)


# --- ROW layout --------------------------------------------------------------------------------
def _pack_codes_row(f: WeightFormat, codes: np.ndarray) -> np.ndarray:
    shape = f.shapes()["B"]
    group_stored = _round_up(f.group, K_ALIGN)
    padded = np.zeros((f.N, f.n_groups * group_stored), np.uint8)
    for j in range(f.n_groups):
        start, length = j * f.group, f.group_length(j)
        padded[:, j * group_stored : j * group_stored + length] = codes[:, start : start + length]
    per_group = padded.reshape(f.N, f.n_groups, group_stored)
    out = pack_bits(per_group, f.bits)
    return out.reshape(shape)


def _unpack_codes_row(f: WeightFormat, data: np.ndarray) -> np.ndarray:
    group_stored = _round_up(f.group, K_ALIGN)
    per_group = unpack_bits(data, f.bits, group_stored)  # [N, G, group_stored]
    codes = np.zeros((f.N, f.K), np.uint8)
    for j in range(f.n_groups):
        start, length = j * f.group, f.group_length(j)
        codes[:, start : start + length] = per_group[:, j, :length]
    return codes


def _pack_row(f: WeightFormat, q: QuantizedWeight) -> dict[str, np.ndarray]:
    out = {"B": _pack_codes_row(f, q.codes)}
    out["scales"] = (q.super_scales if f.hierarchical else q.scales).astype(q.scale_dtype)
    if q.zero_points is not None:
        out["zero_points"] = pack_bits(q.zero_points, f.bits)
    if f.hierarchical:
        out["sub_scales"] = pack_bits(q.sub_scales, f.scale_bits)
    return out


def _unpack_row(f: WeightFormat, t: dict[str, np.ndarray]) -> dict[str, np.ndarray | None]:
    G = f.n_groups
    zp = t.get("zero_points")
    sub = t.get("sub_scales")
    return {
        "codes": _unpack_codes_row(f, t["B"]),
        "scales": t["scales"].astype(np.float32),
        "zero_points": None if zp is None else unpack_bits(zp, f.bits, G),
        "sub_scales": None if sub is None else unpack_bits(sub, f.scale_bits, G),
    }


# --- TILE16 layout -----------------------------------------------------------------------------
# A super-block holds 16 columns x 16 k (256 codes). Code (c, k) sits in k4-step s = k // 4 at
# lane = 4 * c + k % 4 (the order vpdpbusd / sdot consume: 4 consecutive k of one column form one
# int32 lane). Planes per super-block, by bits:
#   2: 64 bytes   byte[lane] = sum_s code[s][lane] << 2s
#   3: 64 bytes   low two bits as for 2-bit, then 4 x 8 bytes: bit `lane` of little-endian uint64
#                 number s = bit 2 of code[s][lane]
#   4: 128 bytes  block h (h = 0, 1): byte[lane] = code[2h][lane] | code[2h+1][lane] << 4
#   5: 160 bytes  bits 0-3 as for 4-bit, then 4 x 8 bytes: bit `lane` of little-endian uint64
#                 number s = bit 4 of code[s][lane]
#   6: 192 bytes  bits 0-3 as for 4-bit, then bits 4-5 as a 2-bit plane:
#                 byte[lane] = sum_s (code[s][lane] >> 4) << 2s
#   8: 256 bytes  block s: byte[lane] = code[s][lane]
def _tile16_lanes(f: WeightFormat, codes: np.ndarray) -> np.ndarray:
    """codes [N, K] -> [T, k_stored/16, 4 (step), 64 (lane)]."""
    T = f.n_tiles
    padded = np.concatenate([codes, np.zeros((f.N, 1), np.uint8)], axis=1)
    stored = padded[:, _stored_k_index(f)]  # [N, k_stored]
    stored = _pad_columns(stored, T * TILE_N)
    x = stored.reshape(T, TILE_N, f.k_stored // 16, 4, 4)  # t, c, sb, s, r
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1, 4)).reshape(T, f.k_stored // 16, 4, 64)


def _tile16_codes(f: WeightFormat, lanes: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_tile16_lanes`."""
    T = f.n_tiles
    x = lanes.reshape(T, f.k_stored // 16, 4, TILE_N, 4).transpose(0, 3, 1, 2, 4)
    stored = x.reshape(T * TILE_N, f.k_stored)[: f.N]
    codes = np.zeros((f.N, f.K), np.uint8)
    src = _stored_k_index(f)
    real = src < f.K
    codes[:, src[real]] = stored[:, real]
    return codes


def _plane2(x: np.ndarray) -> np.ndarray:
    """[T, SB, 4, 64] 2-bit values -> [T, SB, 64]: byte[lane] = sum_s x[s][lane] << 2s."""
    return (x[:, :, 0] | x[:, :, 1] << 2 | x[:, :, 2] << 4 | x[:, :, 3] << 6).astype(np.uint8)


def _unplane2(plane: np.ndarray) -> np.ndarray:
    return np.stack([(plane >> (2 * s)) & 3 for s in range(4)], axis=2)


def _masks(x: np.ndarray) -> np.ndarray:
    """[T, SB, 4, 64] bits -> [T, SB, 32]: four little-endian uint64 lane masks."""
    return np.packbits(x, axis=-1, bitorder="little").reshape(*x.shape[:2], 32)


def _unmasks(data: np.ndarray) -> np.ndarray:
    T, SB = data.shape[:2]
    return np.unpackbits(data.reshape(T, SB, 4, 8), axis=-1, bitorder="little")


def _pack_codes_tile16(f: WeightFormat, codes: np.ndarray) -> np.ndarray:
    x = _tile16_lanes(f, codes)  # [T, SB, 4, 64]
    b = f.bits
    if b == 8:
        out = x.reshape(*x.shape[:2], 256)
    elif b >= 4:
        low = x & 15
        parts = [(low[:, :, 0::2] | (low[:, :, 1::2] << 4)).reshape(*x.shape[:2], 128)]
        if b == 5:
            parts.append(_masks((x >> 4) & 1))
        elif b == 6:
            parts.append(_plane2(x >> 4))
        out = np.concatenate(parts, axis=-1)
    else:
        out = _plane2(x & 3)
        if b == 3:
            out = np.concatenate([out, _masks((x >> 2) & 1)], axis=-1)
    return out.reshape(f.shapes()["B"])


def _unpack_codes_tile16(f: WeightFormat, data: np.ndarray) -> np.ndarray:
    b = f.bits
    T, SB = data.shape[0], data.shape[1]
    if b == 8:
        x = data.reshape(T, SB, 4, 64)
    elif b >= 4:
        blocks = data[:, :, :128].reshape(T, SB, 2, 64)
        x = np.stack([blocks & 15, blocks >> 4], axis=3).reshape(T, SB, 4, 64)
        if b == 5:
            x = x | (_unmasks(data[:, :, 128:160]) << 4)
        elif b == 6:
            x = x | (_unplane2(data[:, :, 128:192]) << 4)
    else:
        x = _unplane2(data[:, :, :64])
        if b == 3:
            x = x | (_unmasks(data[:, :, 64:96]) << 2)
    return _tile16_codes(f, x.astype(np.uint8))


def _tile16_group_values(f: WeightFormat, values: np.ndarray) -> np.ndarray:
    """Per-column group values [N, G] -> [T, G, 16] (padding columns are 0)."""
    v = _pad_columns(values, f.n_tiles * TILE_N)
    return np.ascontiguousarray(v.reshape(f.n_tiles, TILE_N, -1).transpose(0, 2, 1))


def _tile16_column_values(f: WeightFormat, values: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_tile16_group_values`."""
    return values.transpose(0, 2, 1).reshape(f.n_tiles * TILE_N, -1)[: f.N]


def _pack_tile16(f: WeightFormat, q: QuantizedWeight) -> dict[str, np.ndarray]:
    out = {"B": _pack_codes_tile16(f, q.codes)}
    scales = q.super_scales if f.hierarchical else q.scales
    out["scales"] = _tile16_group_values(f, scales.astype(q.scale_dtype))
    if q.zero_points is not None:
        out["zero_points"] = pack_bits(_tile16_group_values(f, q.zero_points), f.bits)
    if f.hierarchical:
        out["sub_scales"] = pack_bits(_tile16_group_values(f, q.sub_scales), f.scale_bits)
    return out


def _unpack_tile16(f: WeightFormat, t: dict[str, np.ndarray]) -> dict[str, np.ndarray | None]:
    zp = t.get("zero_points")
    sub = t.get("sub_scales")
    return {
        "codes": _unpack_codes_tile16(f, t["B"]),
        "scales": _tile16_column_values(f, t["scales"].astype(np.float32)),
        "zero_points": None
        if zp is None
        else _tile16_column_values(f, unpack_bits(zp, f.bits, TILE_N)),
        "sub_scales": None
        if sub is None
        else _tile16_column_values(f, unpack_bits(sub, f.scale_bits, TILE_N)),
    }


_PACKERS = {Layout.ROW: (_pack_row, _unpack_row), Layout.TILE16: (_pack_tile16, _unpack_tile16)}


# --- public pack / unpack ----------------------------------------------------------------------
PACK_CHUNK = 4096  # columns packed at a time: bounds the temporaries of big matrices


def _columns(q: QuantizedWeight, f: WeightFormat, c0: int, c1: int) -> QuantizedWeight:
    """Columns [c0, c1) of ``q`` as a weight of their own (codebook and input scale left out)."""

    def cut(a):
        return None if a is None else a[c0:c1]

    return QuantizedWeight(
        dataclasses.replace(f, N=c1 - c0),
        q.codes[c0:c1],
        q.scales[c0:c1],
        cut(q.zero_points),
        cut(q.super_scales),
        cut(q.sub_scales),
        scale_dtype=q.scale_dtype,
    )


def pack(q: QuantizedWeight, layout: Layout | None = None) -> dict[str, np.ndarray]:
    """Packed tensors of ``q`` in ``layout`` (default: ``q.fmt.layout``), by input name.

    Every per-column tensor of both layouts is indexed by column (ROW) or 16-column tile
    (TILE16) first, so wide matrices are packed in chunks of columns and concatenated."""
    f = q.fmt if layout is None else q.fmt.with_layout(layout)
    packer, _ = _PACKERS[f.layout]
    if f.N <= PACK_CHUNK:
        out = packer(f, q)
    else:
        parts = [
            packer(*(lambda sub: (sub.fmt, sub))(_columns(q, f, c, min(c + PACK_CHUNK, f.N))))
            for c in range(0, f.N, PACK_CHUNK)
        ]
        out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    if q.codebook is not None:
        out["codebook"] = q.codebook.astype(q.scale_dtype)
    if q.input_scale is not None:
        out["input_scale"] = q.input_scale.astype(q.scale_dtype)
    check_packed(out, f)
    return out


def check_packed(t: dict[str, np.ndarray], f: WeightFormat) -> None:
    """Raise :class:`FormatError` unless the tensors have exactly the shapes and dtypes of ``f``."""
    expected = f.shapes()
    for name in ("B", "scales"):
        if name not in t:
            raise FormatError(f"packed weight lacks required tensor {name!r}")
    for name, arr in t.items():
        if name not in TENSOR_ORDER:
            raise FormatError(f"unknown packed tensor {name!r}")
        if name in ("B", "zero_points", "sub_scales"):
            _check_shape(name, arr, expected[name], np.uint8)
        elif name == "scales":
            _check_shape(name, arr, expected[name])
            if arr.dtype not in (np.float16, np.float32):
                raise FormatError(f"scales must be float16 or float32, got {arr.dtype}")
        elif name == "codebook":
            if arr.ndim != 2 or arr.shape[0] not in (1, f.N) or arr.shape[1] != f.code_levels:
                raise FormatError(
                    f"codebook: expected shape [1 or {f.N}, {f.code_levels}], got {arr.shape}"
                )
        elif name == "input_scale":
            _check_shape(name, arr, (f.K,))
    if f.hierarchical != ("sub_scales" in t):
        raise FormatError("sub_scales must be present exactly when scale_bits > 0")
    if "codebook" in t and "zero_points" in t:
        raise FormatError("a codebook weight has no zero points")


def unpack(t: dict[str, np.ndarray], fmt: WeightFormat) -> QuantizedWeight:
    """Logical weight from packed tensors ``t`` (as produced by :func:`pack`)."""
    check_packed(t, fmt)
    _, unpacker = _PACKERS[fmt.layout]
    parts = unpacker(fmt, t)
    scale_dtype = t["scales"].dtype.type
    super_scales = None
    scales = parts["scales"]
    if fmt.hierarchical:
        super_scales = scales
        scales = hierarchical_scales(super_scales, parts["sub_scales"], fmt.super_group)
    codebook = t.get("codebook")
    input_scale = t.get("input_scale")
    return QuantizedWeight(
        fmt=fmt,
        codes=parts["codes"],
        scales=scales,
        zero_points=parts["zero_points"],
        super_scales=super_scales,
        sub_scales=parts["sub_scales"],
        codebook=None if codebook is None else codebook.astype(np.float32),
        input_scale=None if input_scale is None else input_scale.astype(np.float32),
        scale_dtype=scale_dtype,
    )


def packed_bytes(t: dict[str, np.ndarray]) -> int:
    """Bytes of all weight tensors (bias excluded)."""
    return int(sum(a.nbytes for name, a in t.items() if name in TENSOR_ORDER))


def bits_per_weight(t: dict[str, np.ndarray], fmt: WeightFormat) -> float:
    """Exact stored bits per weight: every packed byte (codes, scales, zero points, sub-scales,
    codebook, input scale, layout padding) over K*N."""
    return 8.0 * packed_bytes(t) / (fmt.K * fmt.N)
