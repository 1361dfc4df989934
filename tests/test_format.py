"""The weight format's numpy reference: bit layouts against hand-computed bytes, round trips
for every bits/group/symmetry/layout, exact bits-per-weight, and its refusals."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from quantx_onnx.format import (
    FormatError,
    Layout,
    QuantizedWeight,
    WeightFormat,
    bits_per_weight,
    check_packed,
    dequantize,
    pack,
    pack_bits,
    unpack,
    unpack_bits,
)
from quantx_onnx.quantize.rtn import quantize_rtn


def test_pack_bits_lsb_first_by_hand():
    # 3-bit values 1..7,0: byte0 = 1 | 2<<3 | (3&3)<<6; byte1 = 3>>2 | 4<<1 | 5<<4 | (6&1)<<7;
    # byte2 = 6>>1 | 7<<2 | 0<<5
    assert pack_bits(np.array([1, 2, 3, 4, 5, 6, 7, 0]), 3).tolist() == [209, 88, 31]
    assert pack_bits(np.array([3, 0, 1, 2]), 2).tolist() == [0b10010011]
    assert pack_bits(np.array([0xA, 0x5]), 4).tolist() == [0x5A]
    # padding to whole bytes with zeros
    assert pack_bits(np.array([7]), 3).tolist() == [7]


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_unpack_bits_inverts_pack_bits(bits, rng):
    v = rng.integers(0, 1 << bits, size=(3, 37)).astype(np.uint8)
    assert np.array_equal(unpack_bits(pack_bits(v, bits), bits, 37), v)


def _one_code_weight(fmt: WeightFormat, n: int, k: int, code: int) -> QuantizedWeight:
    codes = np.zeros((fmt.N, fmt.K), np.uint8)
    codes[n, k] = code
    return QuantizedWeight(
        fmt,
        codes,
        np.ones((fmt.N, fmt.n_groups), np.float32),
        zero_points=np.zeros((fmt.N, fmt.n_groups), np.uint8),
    )


def test_tile16_3bit_lane_and_planes_by_hand():
    fmt = WeightFormat(K=64, N=32, bits=3, group_size=32, layout=Layout.TILE16)
    # column 21 = tile 1, c = 5; k = 41 = group 1, super-block 2 overall (k // 16), k in sb = 9:
    # step s = 2, lane = 4*5 + 1 = 21. Low plane byte 21 holds (7 & 3) << 2s = 0x30; the high
    # bit is bit 21 of uint64 s=2, i.e. byte 64 + 8*2 + 2, bit 5.
    B = pack(_one_code_weight(fmt, n=21, k=41, code=7))["B"]
    assert B.shape == (2, 4, 96)
    nz = np.argwhere(B)
    assert nz.tolist() == [[1, 2, 21], [1, 2, 82]]
    assert B[1, 2, 21] == 0x30 and B[1, 2, 82] == 0x20


def test_tile16_5bit_and_6bit_planes_by_hand():
    # column 21 = tile 1, c = 5; k = 41: super-block 2, step s = 2, lane 21 (as above). Bits 0-3
    # sit in the low nibble (s even) of 4-bit block s // 2 = 1: byte 64 + 21 = 85.
    five = WeightFormat(K=64, N=32, bits=5, group_size=32, layout=Layout.TILE16)
    B = pack(_one_code_weight(five, n=21, k=41, code=0b10110))["B"]
    assert B.shape == (2, 4, 160)
    # 0b0110 in the low nibble of byte 85; bit 4 = bit 21 of uint64 s = 2: byte 128 + 16 + 2, bit 5
    assert {tuple(i): int(B[tuple(i)]) for i in np.argwhere(B)} == {
        (1, 2, 85): 0b0110,
        (1, 2, 146): 0x20,
    }
    six = WeightFormat(K=64, N=32, bits=6, group_size=32, layout=Layout.TILE16)
    B = pack(_one_code_weight(six, n=21, k=41, code=0b101001))["B"]
    assert B.shape == (2, 4, 192)
    # 0b1001 in byte 85; bits 4-5 (0b10) in the 2-bit plane at byte 128 + 21, shifted by 2s = 4
    assert {tuple(i): int(B[tuple(i)]) for i in np.argwhere(B)} == {
        (1, 2, 85): 0b1001,
        (1, 2, 149): 0b10 << 4,
    }


@pytest.mark.parametrize(
    "bits,expect", [(2, {(0, 13): 3 << 2}), (4, {(0, 13): 0xF0}), (8, {(64 + 13,): 255})]
)
def test_tile16_other_bits_by_hand(bits, expect):
    fmt = WeightFormat(K=16, N=16, bits=bits, group_size=16, layout=Layout.TILE16)
    code = (1 << bits) - 1
    # column 3, k = 5: step 1, lane 13
    B = pack(_one_code_weight(fmt, n=3, k=5, code=code))["B"].reshape(-1)
    nz = {int(i): int(B[i]) for i in np.flatnonzero(B)}
    want = {}
    for idx, val in expect.items():
        want[idx[0] if len(idx) == 1 else idx[0] * 64 + idx[1]] = val
    assert nz == want


def test_row_layout_bit_position_by_hand():
    fmt = WeightFormat(K=80, N=3, bits=3, group_size=32, layout=Layout.ROW)
    # column 2, k = 37: group 1, position 5 -> stream bits 15..17 of B[2, 1]
    B = pack(_one_code_weight(fmt, n=2, k=37, code=5))["B"]
    assert B.shape == (3, 3, 12)
    stream = np.unpackbits(B[2, 1], bitorder="little")
    assert np.flatnonzero(stream).tolist() == [15, 17]  # 5 = 0b101
    assert np.count_nonzero(B) == 2


def test_zero_points_tile16_by_hand():
    fmt = WeightFormat(K=32, N=20, bits=3, group_size=16, layout=Layout.TILE16)
    q = _one_code_weight(fmt, 0, 0, 0)
    q.zero_points[17, 1] = 6  # tile 1, c = 1, group 1 -> bits 3..5 of zp[1, 1]
    zp = pack(q)["zero_points"]
    assert zp.shape == (2, 2, 6)
    assert np.argwhere(zp).tolist() == [[1, 1, 0]] and zp[1, 1, 0] == 6 << 3


def _formats():
    for bits, group, sym, layout, (K, N) in itertools.product(
        (2, 3, 4, 5, 6, 8),
        (16, 32, 64, 128, 0),
        (False, True),
        (Layout.ROW, Layout.TILE16),
        ((128, 48), (100, 7), (33, 17)),
    ):
        yield bits, group, sym, layout, K, N


@pytest.mark.parametrize("bits,group,sym,layout,K,N", list(_formats()))
def test_round_trip_every_combination(bits, group, sym, layout, K, N, rng):
    if group and group >= K:
        group = 0
    fmt = WeightFormat(K, N, bits, group, layout)
    w = rng.standard_normal((K, N)).astype(np.float32)
    q = quantize_rtn(w, fmt, symmetric=sym)
    packed = pack(q)
    check_packed(packed, fmt)
    back = unpack(packed, fmt)
    assert np.array_equal(back.codes, q.codes)
    assert np.array_equal(back.scales, q.scales)
    if sym:
        assert back.zero_points is None and "zero_points" not in packed
    else:
        assert np.array_equal(back.zero_points, q.zero_points)
    # dequantize follows the definition w = s * (q - z), computed here element by element
    d = dequantize(packed, fmt)
    g = fmt.group
    zp = q.effective_zero_points
    n, k = N - 1, K - 1
    assert d[k, n] == np.float32(
        q.scales[n, k // g] * (float(q.codes[n, k]) - float(zp[n, k // g]))
    )
    # and round-to-nearest stays within half a step (plus fp16 scale rounding) of the input
    step = np.abs(q.scales)[:, np.arange(K) // g].T
    inside = (w >= d - step) & (w <= d + step)
    assert inside.mean() > 0.95


@pytest.mark.parametrize("layout", [Layout.ROW, Layout.TILE16])
def test_hierarchical_round_trip(layout, rng):
    fmt = WeightFormat(200, 40, 3, 32, layout, scale_bits=4, super_group=4)
    w = rng.standard_normal((200, 40)).astype(np.float32)
    q = quantize_rtn(w, fmt)
    packed = pack(q)
    assert packed["scales"].shape[-2 if layout == Layout.TILE16 else -1] == 2  # 7 groups / 4
    back = unpack(packed, fmt)
    assert np.array_equal(back.scales, q.scales)
    assert np.array_equal(dequantize(back), dequantize(q))


def test_codebook_and_input_scale_round_trip(rng):
    fmt = WeightFormat(64, 24, 3, 32, Layout.TILE16)
    codes = rng.integers(0, 8, (24, 64)).astype(np.uint8)
    cb = np.sort(rng.standard_normal((24, 8)).astype(np.float16).astype(np.float32), axis=1)
    scales = rng.standard_normal((24, 2)).astype(np.float16).astype(np.float32)
    s_in = rng.uniform(0.5, 2, 64).astype(np.float16).astype(np.float32)
    q = QuantizedWeight(fmt, codes, scales, codebook=cb, input_scale=s_in)
    back = unpack(pack(q), fmt)
    d = dequantize(back)
    expect = (scales[:, np.arange(64) // 32] * cb[np.arange(24)[:, None], codes]).T * s_in[:, None]
    np.testing.assert_allclose(d, expect, rtol=1e-6)


def test_bits_per_weight_is_exact():
    fmt = WeightFormat(4096, 4096, 3, 64, Layout.TILE16)
    q = quantize_rtn(np.zeros((4096, 4096), np.float32), fmt)
    packed = pack(q)
    # 3-bit codes + fp16 scale and 3-bit zero point per 64 weights
    assert bits_per_weight(packed, fmt) == pytest.approx(3 + 16 / 64 + 3 / 64, abs=1e-12)
    hier = WeightFormat(4096, 4096, 3, 32, Layout.TILE16, scale_bits=4, super_group=8)
    packed = pack(quantize_rtn(np.ones((4096, 4096), np.float32), hier))
    assert bits_per_weight(packed, hier) == pytest.approx(3 + (4 + 3) / 32 + 16 / 256, abs=1e-12)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(K=64, N=8, bits=7), "bits"),
        (dict(K=64, N=8, bits=3, group_size=24), "group_size"),
        (dict(K=0, N=8, bits=3), "K and N"),
        (dict(K=64, N=8, bits=3, scale_bits=9, super_group=4), "scale_bits"),
        (dict(K=64, N=8, bits=3, scale_bits=4, super_group=1), "super_group"),
    ],
)
def test_invalid_formats_are_refused(kwargs, match):
    with pytest.raises(FormatError, match=match):
        WeightFormat(**kwargs)


def test_check_packed_names_the_bad_tensor(rng):
    fmt = WeightFormat(64, 16, 3, 32, Layout.TILE16)
    packed = pack(quantize_rtn(rng.standard_normal((64, 16)).astype(np.float32), fmt))
    bad = dict(packed, B=packed["B"][:, :-1])
    with pytest.raises(FormatError, match="B: expected shape"):
        check_packed(bad, fmt)
    with pytest.raises(FormatError, match="zero_points"):
        check_packed(dict(packed, zero_points=packed["zero_points"].astype(np.int8)), fmt)
    with pytest.raises(FormatError, match="codes exceed"):
        QuantizedWeight(fmt, np.full((16, 64), 9, np.uint8), np.ones((16, 2), np.float32))
