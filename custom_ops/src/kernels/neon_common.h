// ARM64 NEON kernels shared by the "neon" (ARMv8.0-A) and "neon-dotprod" (ARMv8.2-A + dotprod)
// tables, templated on the int8 dot-product policy (NoDotProd / DotProd below). The layout
// reasoning is in the comment blocks of kernel_neon.cc and kernel_neon_dot.cc.
//
// Each including file first defines QX_NEON_NS, a namespace of its own: the two files are
// compiled for different -march, and an inline function or template instance they shared
// would be merged by the linker, possibly keeping the dotprod copy for the baseline table.
// For the same reason nothing here instantiates a standard-library template.
//
// Structure of a matmul call:
//  - Native (TILE16, uniform grid, every width: 2-6 and 8 bits; any zero points, scale type,
//    hierarchical scales):
//    * at most kFusedRowsMax rows (decode): the packed super-blocks of a tile are streamed
//      once and unpacked in registers, straight into the dot products (Fused*);
//    * more rows (prefill): each (tile, k-block) is unpacked once into an L1 buffer (int8 in
//      sdot lane order, or dequantized fp32 [k][16]) and reused by all rows through a
//      register-blocked micro-kernel (Buffered + Micro*).
//  - Everything else (ROW layout, codebooks): the portable UnpackTileU8 / DequantTileF32 fill
//    the same buffers, and the same micro-kernels run on them.
// Integer dot products are exact (they equal the reference's); only float rounding and
// summation order differ from the reference (e.g. the fused float path scales block sums).
#pragma once

#if defined(__aarch64__)

#if defined(__AARCH64EB__)
#error "the NEON kernels assume little-endian lane order"
#endif

#include <arm_neon.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "decode.h"
#include "portable.h"

#ifndef QX_NEON_NS
#error "define QX_NEON_NS (a namespace private to the including file) before neon_common.h"
#endif

#define QX_INLINE inline __attribute__((always_inline))
// Small constant loops over rows / quarters / steps are unrolled before scalar replacement, so
// that arrays of vectors indexed by them live in registers rather than on the stack.
#if defined(__clang__)
#define QX_UNROLL _Pragma("unroll")
#define QX_NO_UNROLL _Pragma("nounroll")
#else
#define QX_UNROLL _Pragma("GCC unroll 16")
#define QX_NO_UNROLL _Pragma("GCC unroll 1")
#endif

namespace quantx {
namespace QX_NEON_NS {

constexpr int kFusedRowsMax = 4;     // matmul calls with at most this many rows: fused decode
constexpr int64_t kChunkRows = 256;  // buffered path: rows per accumulator chunk (16 KB)

inline int64_t MinI64(int64_t a, int64_t b) { return a < b ? a : b; }

// ---------------------------------------------------------------------------------------------
// Small helpers

// Widens 16 bytes to 4 x int32x4 (lanes 0-3, 4-7, 8-11, 12-15).
QX_INLINE void WidenU8(uint8x16_t v, int32x4_t* out) {
  const uint16x8_t lo = vmovl_u8(vget_low_u8(v)), hi = vmovl_high_u8(v);
  out[0] = vreinterpretq_s32_u32(vmovl_u16(vget_low_u16(lo)));
  out[1] = vreinterpretq_s32_u32(vmovl_high_u16(lo));
  out[2] = vreinterpretq_s32_u32(vmovl_u16(vget_low_u16(hi)));
  out[3] = vreinterpretq_s32_u32(vmovl_high_u16(hi));
}

// The 16 kB-bit values of an LSB-first bit stream of 2 * kB bytes (zero points, sub-scales).
template <int kB>
QX_INLINE uint8x16_t UnpackBits16(const uint8_t* stream) {
  uint64_t w[2] = {0, 0};
  std::memcpy(w, stream, 2 * kB);
  alignas(16) uint8_t out[16];
  QX_UNROLL
  for (int c = 0; c < 16; ++c) {
    const int bit = c * kB, word = bit >> 6, shift = bit & 63;
    uint64_t v = w[word] >> shift;
    if (shift + kB > 64) v |= w[word + 1] << (64 - shift);
    out[c] = static_cast<uint8_t>(v & ((1u << kB) - 1u));
  }
  return vld1q_u8(out);
}

inline uint8x16_t UnpackBits16(const uint8_t* stream, int bits) {
  switch (bits) {
    case 2:
      return UnpackBits16<2>(stream);
    case 3:
      return UnpackBits16<3>(stream);
    case 4:
      return UnpackBits16<4>(stream);
    case 5:
      return UnpackBits16<5>(stream);
    case 6:
      return UnpackBits16<6>(stream);
    case 7:
      return UnpackBits16<7>(stream);
    default:
      return UnpackBits16<8>(stream);
  }
}

// Writes acc[c] + bias for the valid columns of `tile` into row m of Y.
QX_INLINE void StoreRow(const MatMulArgs& args, int64_t m, int64_t tile, const float* acc) {
  const int64_t n0 = tile * kTileN;
  if (n0 + kTileN > args.w->fmt.N) {
    StoreTileRow(args, m, tile, acc);
    return;
  }
  float* y = args.y + m * args.ldy + n0;
  QX_UNROLL
  for (int q = 0; q < 4; ++q) {
    float32x4_t v = vld1q_f32(acc + 4 * q);
    if (args.bias) v = vaddq_f32(v, vld1q_f32(args.bias + n0 + 4 * q));
    vst1q_f32(y + 4 * q, v);
  }
}

// ---------------------------------------------------------------------------------------------
// Group parameters of a native (TILE16, uniform grid) weight, one vector per quarter (4 columns).

struct GroupParams {
  float32x4_t scale[4];  // effective scale (hierarchical: super-scale * (sub + 1))
  int32x4_t zero[4];     // integer zero point (symmetric: 2^(bits-1))
};

template <int kBits>
inline void LoadGroupParams(const WeightView& w, int64_t tile, int64_t group, GroupParams* p) {
  const WeightFormat& f = w.fmt;
  const int64_t G = f.n_groups();
  const int64_t n_scales = f.scale_bits ? f.n_super() : G;
  const int64_t scale_group = f.scale_bits ? group / f.super_group : group;
  const int64_t at = (tile * n_scales + scale_group) * kTileN;
  QX_UNROLL
  for (int q = 0; q < 4; ++q) {
    if (w.scales_f16) {  // fcvtl is exact for every half, like HalfToFloat
      const uint16_t* s = static_cast<const uint16_t*>(w.scales) + at + 4 * q;
      p->scale[q] = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(s)));
    } else {
      p->scale[q] = vld1q_f32(static_cast<const float*>(w.scales) + at + 4 * q);
    }
  }
  if (f.scale_bits) {
    int32x4_t sub[4];
    WidenU8(UnpackBits16(w.sub_scales + (tile * G + group) * 2 * f.scale_bits, f.scale_bits), sub);
    QX_UNROLL
    for (int q = 0; q < 4; ++q)
      p->scale[q] = vmulq_f32(p->scale[q], vcvtq_f32_s32(vaddq_s32(sub[q], vdupq_n_s32(1))));
  }
  if (w.zero_points) {
    WidenU8(UnpackBits16<kBits>(w.zero_points + (tile * G + group) * 2 * kBits), p->zero);
  } else {
    QX_UNROLL
    for (int q = 0; q < 4; ++q) p->zero[q] = vdupq_n_s32(1 << (kBits - 1));
  }
}

// ---------------------------------------------------------------------------------------------
// TILE16 readers. Tile16Reader<b>(sb).Quarter(q, out) sets out[s] (s = k4-step 0..3) to the codes
// of columns 4q..4q+3 at k = 4s..4s+3 of super-block sb, as unsigned bytes in lane 4c + r
// (column 4q + c, k = 4s + r): the 16 bytes one sdot consumes against 4 activations.

template <int kBits>
struct Tile16Reader;

template <>
struct Tile16Reader<2> {  // quarter q of the 64-byte plane holds all 4 steps: 2-bit fields
  const uint8_t* sb;
  explicit Tile16Reader(const uint8_t* p) : sb(p) {}
  QX_INLINE void Quarter(int q, uint8x16_t* out) const {
    const uint8x16_t p = vld1q_u8(sb + 16 * q), m3 = vdupq_n_u8(3);
    out[0] = vandq_u8(p, m3);
    out[1] = vandq_u8(vshrq_n_u8(p, 2), m3);
    out[2] = vandq_u8(vshrq_n_u8(p, 4), m3);
    out[3] = vshrq_n_u8(p, 6);
  }
};

// tbl indices broadcasting the 2 high-bit bytes of (step s, quarter q) over 8 lanes each, from
// the 16-byte register holding the masks of steps 2 * (s / 2) and 2 * (s / 2) + 1.
struct HighIdxTable {
  uint8_t v[2][4][16];
  constexpr HighIdxTable() : v() {
    for (int p = 0; p < 2; ++p)
      for (int q = 0; q < 4; ++q)
        for (int l = 0; l < 16; ++l) v[p][q][l] = static_cast<uint8_t>(8 * p + 2 * q + (l >> 3));
  }
};
alignas(16) constexpr HighIdxTable kHighIdx;

// One bit per lane from the uint64 masks of the 3-bit (bit 2) and 5-bit (bit 4) layouts: 0xff
// in lane l where bit 16q + l of step s's mask is set. high[p] holds the masks of steps 2p and
// 2p + 1. Lane l is bit l % 8 of byte 2q + l / 8: tbl broadcasts the 2 bytes over 8 lanes
// each, cmtst against 1 << (l % 8) tests its bit.
QX_INLINE uint8x16_t MaskBits(const uint8x16_t* high, int s, int q) {
  const uint8x16_t bitsel = vreinterpretq_u8_u64(vdupq_n_u64(0x8040201008040201ull));
  return vtstq_u8(vqtbl1q_u8(high[s >> 1], vld1q_u8(kHighIdx.v[s & 1][q])), bitsel);
}

template <>
struct Tile16Reader<3> {  // 2-bit low plane as above + bit `lane` of uint64 s
  const uint8_t* sb;
  uint8x16_t high[2];  // high-bit masks of steps 0, 1 and of steps 2, 3
  explicit Tile16Reader(const uint8_t* p) : sb(p) {
    high[0] = vld1q_u8(p + 64);
    high[1] = vld1q_u8(p + 80);
  }
  QX_INLINE void Quarter(int q, uint8x16_t* out) const {
    const uint8x16_t p = vld1q_u8(sb + 16 * q), m3 = vdupq_n_u8(3);
    const uint8x16_t low[4] = {p, vshrq_n_u8(p, 2), vshrq_n_u8(p, 4), vshrq_n_u8(p, 6)};
    QX_UNROLL
    for (int s = 0; s < 4; ++s) {
      const uint8x16_t hi = vshrq_n_u8(MaskBits(high, s, q), 5);  // 7 where the bit is set
      out[s] = vbslq_u8(m3, low[s], hi);                          // low 2 bits | 4
    }
  }
};

template <>
struct Tile16Reader<4> {  // plane h: steps 2h (low nibble) and 2h + 1 (high nibble)
  const uint8_t* sb;
  explicit Tile16Reader(const uint8_t* p) : sb(p) {}
  QX_INLINE void Quarter(int q, uint8x16_t* out) const {
    const uint8x16_t p0 = vld1q_u8(sb + 16 * q), p1 = vld1q_u8(sb + 64 + 16 * q);
    const uint8x16_t m15 = vdupq_n_u8(15);
    out[0] = vandq_u8(p0, m15);
    out[1] = vshrq_n_u8(p0, 4);
    out[2] = vandq_u8(p1, m15);
    out[3] = vshrq_n_u8(p1, 4);
  }
};

// 5 and 6 bits: bits 0-3 are the 4-bit layout above (bytes 0..127), bits 4 (5-bit) or 4-5
// (6-bit) follow at byte 128. Each high part is merged with its nibble by one bit-insert
// (bsl / sli / sri) that also does the nibble's own and #15 or ushr #4, so the 4-bit path's
// 4 instructions per quarter become 16 (5-bit) or 8 (6-bit).
template <>
struct Tile16Reader<5> {  // nibble planes + bit 4 of step s as bit `lane` of uint64 s (3-bit's)
  const uint8_t* sb;
  uint8x16_t high[2];  // bit-4 masks of steps 0, 1 and of steps 2, 3
  explicit Tile16Reader(const uint8_t* p) : sb(p) {
    high[0] = vld1q_u8(p + 128);
    high[1] = vld1q_u8(p + 144);
  }
  QX_INLINE void Quarter(int q, uint8x16_t* out) const {
    const uint8x16_t p0 = vld1q_u8(sb + 16 * q), p1 = vld1q_u8(sb + 64 + 16 * q);
    const uint8x16_t m15 = vdupq_n_u8(15);
    // hi[s]: 0x1f where bit 4 is set, else 0. Its bits 5-7 are clear, so inserting the nibble
    // into bits 0-3 leaves exactly the code.
    uint8x16_t hi[4];
    QX_UNROLL
    for (int s = 0; s < 4; ++s) hi[s] = vshrq_n_u8(MaskBits(high, s, q), 3);
    out[0] = vbslq_u8(m15, p0, hi[0]);  // (p0 & 15) | bit 4
    out[1] = vsriq_n_u8(hi[1], p0, 4);  // (p0 >> 4) | bit 4
    out[2] = vbslq_u8(m15, p1, hi[2]);
    out[3] = vsriq_n_u8(hi[3], p1, 4);
  }
};

template <>
struct Tile16Reader<6> {  // nibble planes + bits 4-5 of step s in a 2-bit plane (2-bit's)
  const uint8_t* sb;
  explicit Tile16Reader(const uint8_t* p) : sb(p) {}
  QX_INLINE void Quarter(int q, uint8x16_t* out) const {
    const uint8x16_t p0 = vld1q_u8(sb + 16 * q), p1 = vld1q_u8(sb + 64 + 16 * q);
    const uint8x16_t pl = vld1q_u8(sb + 128 + 16 * q);
    const uint8x16_t m15 = vdupq_n_u8(15), m33 = vdupq_n_u8(0x33);
    // even: pairs of steps 0 and 2 at bits 0-1 and 4-5; odd: those of steps 1 and 3. Bits 4-5
    // are already in place for steps 2 and 3, and sli #4 drops the other pair for steps 0, 1.
    const uint8x16_t even = vandq_u8(pl, m33), odd = vandq_u8(vshrq_n_u8(pl, 2), m33);
    out[0] = vsliq_n_u8(p0, even, 4);                // (pair0 << 4) | (p0 & 15)
    out[1] = vsliq_n_u8(vshrq_n_u8(p0, 4), odd, 4);  // (pair1 << 4) | (p0 >> 4)
    out[2] = vbslq_u8(m15, p1, even);                // (p1 & 15) | (pair2 << 4)
    out[3] = vsriq_n_u8(odd, p1, 4);                 // (p1 >> 4) | (pair3 << 4)
  }
};

template <>
struct Tile16Reader<8> {  // plane s: step s
  const uint8_t* sb;
  explicit Tile16Reader(const uint8_t* p) : sb(p) {}
  QX_INLINE void Quarter(int q, uint8x16_t* out) const {
    QX_UNROLL
    for (int s = 0; s < 4; ++s) out[s] = vld1q_u8(sb + 64 * s + 16 * q);
  }
};

// Int8 path: codes as signed sdot operands. Codes of at most 6 bits are < 64 and used as they
// are; 8-bit codes are shifted by -128 (eor 0x80), which the zero term absorbs:
// sum (q - z) a = sum (q - 128) a - (z - 128) sum a.
template <int kBits>
constexpr int kCodeOffset = kBits == 8 ? 128 : 0;

template <int kBits>
QX_INLINE int8x16_t ToS8(uint8x16_t u) {
  if (kBits == 8) return vreinterpretq_s8_u8(veorq_u8(u, vdupq_n_u8(0x80)));
  return vreinterpretq_s8_u8(u);
}

// k4-steps the smull route (NoDotProd) may sum in int16 before folding into int32, from the
// largest |signed code|: 15 (<= 4 bits), 63 (5, 6 bits), 128 (8 bits, shifted).
template <int kBits>
constexpr int kFoldSteps = kBits <= 4 ? 4 : kBits <= 6 ? 2 : 1;

// Float path: out[r] lane c = code(column c, k = r) - zero(c), exactly. One tbl per output both
// transposes the 4 x 4 bytes to [k][column] order and widens them to int32 lanes (out-of-range
// indices give 0); orr #0x4b, lsl #24 makes the fp32 bit pattern 0x4b0000cc = 2^23 + code, and
// zb holds 2^23 + zero.
struct F32IdxTable {
  uint8_t v[4][16];
  constexpr F32IdxTable() : v() {
    for (int r = 0; r < 4; ++r)
      for (int c = 0; c < 4; ++c) {
        v[r][4 * c] = static_cast<uint8_t>(4 * c + r);
        v[r][4 * c + 1] = v[r][4 * c + 2] = v[r][4 * c + 3] = 0xff;
      }
  }
};
alignas(16) constexpr F32IdxTable kF32Idx;

QX_INLINE float32x4_t ZeroBias(int32x4_t zero) {
  return vaddq_f32(vcvtq_f32_s32(zero), vdupq_n_f32(8388608.0f));
}

QX_INLINE void CodesToF32(uint8x16_t codes, float32x4_t zb, float32x4_t* out) {
  QX_UNROLL
  for (int r = 0; r < 4; ++r) {
    const uint32x4_t u = vreinterpretq_u32_u8(vqtbl1q_u8(codes, vld1q_u8(kF32Idx.v[r])));
    out[r] = vsubq_f32(vreinterpretq_f32_u32(vorrq_u32(u, vdupq_n_u32(0x4b000000u))), zb);
  }
}

// ---------------------------------------------------------------------------------------------
// Int8 dot-product policies. SuperBlock<kSets, kFold>(acc, w, a) adds to the accumulator of one
// quarter (lane c: column 4q + c) sum_{s, r < 4} w[s][4c + r] * a[4s + r], where w holds the 4
// k4-steps of the quarter and a the 16 activations of the super-block. kSets = 2 spreads the
// steps over acc[0] and acc[1] (two dependency chains for one-row decode). kFold (1, 2 or 4,
// see kFoldSteps) bounds |w|: 128, 63 or 15.

struct NoDotProd {
  static constexpr int kFusedRows = 2;  // rows per fused decode pass (register budget)
  static constexpr int kMicroRows = 2;  // rows per buffered micro-kernel call

  // smull / smull2 of one step give int16 products [c0 x4, c1 x4] and [c2 x4, c3 x4]; addp folds
  // k pairs into [c0 c0 c1 c1 c2 c2 c3 c3] and sadalp the rest into int32 [c0 c1 c2 c3] -- the
  // sdot accumulator shape. kFold steps are summed with smlal before each addp + sadalp, so an
  // int16 lane after addp holds 2 * kFold products, |a| <= 127: 2 * 128 * 127 (8-bit codes, one
  // step), 4 * 63 * 127 = 32004 (5/6-bit, two steps), 8 * 15 * 127 (<= 4 bits, all four): each
  // < 2^15.
  template <int kSets, int kFold>
  static QX_INLINE void SuperBlock(int32x4_t* acc, const int8x16_t* w, int8x16_t a) {
    static_assert(kFold == 1 || kFold == 2 || kFold == 4, "steps per int16 fold");
    const int32x4_t a32 = vreinterpretq_s32_s8(a);
    int8x16_t rep[4];  // activations of step s in every int32 lane
    rep[0] = vreinterpretq_s8_s32(vdupq_laneq_s32(a32, 0));
    rep[1] = vreinterpretq_s8_s32(vdupq_laneq_s32(a32, 1));
    rep[2] = vreinterpretq_s8_s32(vdupq_laneq_s32(a32, 2));
    rep[3] = vreinterpretq_s8_s32(vdupq_laneq_s32(a32, 3));
    QX_UNROLL
    for (int s0 = 0; s0 < 4; s0 += kFold) {
      int16x8_t lo = vmull_s8(vget_low_s8(w[s0]), vget_low_s8(rep[s0]));
      int16x8_t hi = vmull_high_s8(w[s0], rep[s0]);
      QX_UNROLL
      for (int s = s0 + 1; s < s0 + kFold; ++s) {
        lo = vmlal_s8(lo, vget_low_s8(w[s]), vget_low_s8(rep[s]));
        hi = vmlal_high_s8(hi, w[s], rep[s]);
      }
      const int set = (s0 / kFold) % kSets;
      acc[set] = vpadalq_s16(acc[set], vpaddq_s16(lo, hi));
    }
  }
};

#if defined(__ARM_FEATURE_DOTPROD)
struct DotProd {
  static constexpr int kFusedRows = 4;
  static constexpr int kMicroRows = 4;

  // sdot by element: lane c += dot(w[s] bytes 4c..4c+3, a bytes 4s..4s+3).
  template <int kSets, int kFold>
  static QX_INLINE void SuperBlock(int32x4_t* acc, const int8x16_t* w, int8x16_t a) {
    acc[0] = vdotq_laneq_s32(acc[0], w[0], a, 0);
    acc[1 % kSets] = vdotq_laneq_s32(acc[1 % kSets], w[1], a, 1);
    acc[0] = vdotq_laneq_s32(acc[0], w[2], a, 2);
    acc[1 % kSets] = vdotq_laneq_s32(acc[1 % kSets], w[3], a, 3);
  }
};
#endif

// out[4q..4q+3] += scale * sa * (dot - zero * isum), as the reference (exact integers up to the
// final multiply: |dot|, |zero * isum| < 2^23).
QX_INLINE void Int8Epilogue(const int32x4_t* dot, const int32x4_t* zero, const float32x4_t* scale,
                            int32_t isum, float sa, float* out) {
  const int32x4_t vs = vdupq_n_s32(isum);
  QX_UNROLL
  for (int q = 0; q < 4; ++q) {
    const float32x4_t d = vcvtq_f32_s32(vmlsq_s32(dot[q], zero[q], vs));
    vst1q_f32(out + 4 * q, vfmaq_f32(vld1q_f32(out + 4 * q), d, vmulq_n_f32(scale[q], sa)));
  }
}

// ---------------------------------------------------------------------------------------------
// Fused decode kernels (native TILE16, MR <= 4 rows, one tile): every block's super-blocks are
// read once, unpacked in registers and consumed by all MR rows.

template <class P, int kBits, int MR>
void FusedInt8Tile(const MatMulArgs& args, int64_t tile, int64_t m0) {
  constexpr int kSets = MR == 1 ? 2 : 1;
  constexpr int kSB = 32 * kBits;
  const WeightView& w = *args.w;
  const uint8_t* codes = w.B + tile * (w.fmt.k_stored() / kKAlign) * kSB;
  const int64_t lda = args.lda;
  alignas(16) float out[MR][kTileN] = {};
  GroupParams gp{};
  int32x4_t zero[4] = {};
  int64_t group = -1;
  for (int64_t bi = 0; bi < args.n_blocks; ++bi) {
    const KBlock& b = args.blocks[bi];
    if (b.group != group) {
      group = b.group;
      LoadGroupParams<kBits>(w, tile, group, &gp);
      QX_UNROLL
      for (int q = 0; q < 4; ++q) zero[q] = vsubq_s32(gp.zero[q], vdupq_n_s32(kCodeOffset<kBits>));
    }
    int32x4_t acc[MR][4][kSets] = {};
    const uint8_t* sb = codes + b.offset / kKAlign * kSB;
    const int8_t* a = args.a_i8 + m0 * lda + b.offset;
    for (int64_t k = 0; k < b.length; k += kKAlign, sb += kSB) {
      const Tile16Reader<kBits> rd(sb);
      int8x16_t av[MR];
      QX_UNROLL
      for (int r = 0; r < MR; ++r) av[r] = vld1q_s8(a + r * lda + k);
      QX_UNROLL
      for (int q = 0; q < 4; ++q) {
        uint8x16_t u[4];
        rd.Quarter(q, u);
        int8x16_t v[4];
        QX_UNROLL
        for (int s = 0; s < 4; ++s) v[s] = ToS8<kBits>(u[s]);
        QX_UNROLL
        for (int r = 0; r < MR; ++r)
          P::template SuperBlock<kSets, kFoldSteps<kBits>>(acc[r][q], v, av[r]);
      }
    }
    QX_UNROLL
    for (int r = 0; r < MR; ++r) {
      int32x4_t dot[4];
      QX_UNROLL
      for (int q = 0; q < 4; ++q)
        dot[q] = kSets == 2 ? vaddq_s32(acc[r][q][0], acc[r][q][kSets - 1]) : acc[r][q][0];
      const int64_t at = (m0 + r) * args.n_blocks + bi;
      Int8Epilogue(dot, zero, gp.scale, args.a_sum[at], args.a_scale[at], out[r]);
    }
  }
  QX_UNROLL
  for (int r = 0; r < MR; ++r) StoreRow(args, m0 + r, tile, out[r]);
}

// Float path, one quarter (4 columns) at a time over the block: independent fmla chains per row
// and k % 4 (k % 2 from 3 rows on, for registers); the block sum is scaled once per block.
template <int kBits, int MR>
void FusedFloatTile(const MatMulArgs& args, int64_t tile, int64_t m0) {
  constexpr int kSB = 32 * kBits;
  constexpr int kChains = MR <= 2 ? 4 : 2;
  const WeightView& w = *args.w;
  const uint8_t* codes = w.B + tile * (w.fmt.k_stored() / kKAlign) * kSB;
  const int64_t lda = args.lda;
  alignas(16) float out[MR][kTileN] = {};
  GroupParams gp{};
  float32x4_t zb[4] = {};
  int64_t group = -1;
  for (int64_t bi = 0; bi < args.n_blocks; ++bi) {
    const KBlock& b = args.blocks[bi];
    if (b.group != group) {
      group = b.group;
      LoadGroupParams<kBits>(w, tile, group, &gp);
      QX_UNROLL
      for (int q = 0; q < 4; ++q) zb[q] = ZeroBias(gp.zero[q]);
    }
    const uint8_t* sb0 = codes + b.offset / kKAlign * kSB;
    const float* a = args.a_f32 + m0 * lda + b.offset;
    QX_NO_UNROLL
    for (int q = 0; q < 4; ++q) {
      float32x4_t acc[MR][kChains] = {};  // [row][k % kChains]
      const float32x4_t zq = zb[q];
      const uint8_t* sb = sb0;
      for (int64_t k = 0; k < b.length; k += kKAlign, sb += kSB) {
        uint8x16_t u[4];
        Tile16Reader<kBits>(sb).Quarter(q, u);
        QX_UNROLL
        for (int s = 0; s < 4; ++s) {
          float32x4_t x[4];
          CodesToF32(u[s], zq, x);
          QX_UNROLL
          for (int r = 0; r < MR; ++r) {
            const float32x4_t av = vld1q_f32(a + r * lda + k + 4 * s);
            acc[r][0] = vfmaq_laneq_f32(acc[r][0], x[0], av, 0);
            acc[r][1] = vfmaq_laneq_f32(acc[r][1], x[1], av, 1);
            acc[r][2 % kChains] = vfmaq_laneq_f32(acc[r][2 % kChains], x[2], av, 2);
            acc[r][3 % kChains] = vfmaq_laneq_f32(acc[r][3 % kChains], x[3], av, 3);
          }
        }
      }
      QX_UNROLL
      for (int r = 0; r < MR; ++r) {
        float32x4_t sum = vaddq_f32(acc[r][0], acc[r][1]);
        if (kChains == 4) sum = vaddq_f32(sum, vaddq_f32(acc[r][2 % kChains], acc[r][3 % kChains]));
        vst1q_f32(out[r] + 4 * q, vfmaq_f32(vld1q_f32(out[r] + 4 * q), sum, gp.scale[q]));
      }
    }
  }
  QX_UNROLL
  for (int r = 0; r < MR; ++r) StoreRow(args, m0 + r, tile, out[r]);
}

template <class P, int kBits>
void Fused(const MatMulArgs& args, int64_t t0, int64_t t1, int64_t r0, int64_t r1) {
  const bool int8 = args.path == ComputePath::kInt8;
  const int64_t pass = int8 ? P::kFusedRows : kFusedRowsMax;
  for (int64_t t = t0; t < t1; ++t) {
    for (int64_t m = r0; m < r1; m += pass) {
      const int64_t n = MinI64(pass, r1 - m);
      if (int8) {
        switch (n) {
          case 1:
            FusedInt8Tile<P, kBits, 1>(args, t, m);
            break;
          case 2:
            FusedInt8Tile<P, kBits, 2>(args, t, m);
            break;
          case 3:
            FusedInt8Tile<P, kBits, (P::kFusedRows >= 3 ? 3 : 1)>(args, t, m);
            break;
          default:
            FusedInt8Tile<P, kBits, (P::kFusedRows >= 4 ? 4 : 1)>(args, t, m);
            break;
        }
      } else {
        switch (n) {
          case 1:
            FusedFloatTile<kBits, 1>(args, t, m);
            break;
          case 2:
            FusedFloatTile<kBits, 2>(args, t, m);
            break;
          case 3:
            FusedFloatTile<kBits, 3>(args, t, m);
            break;
          default:
            FusedFloatTile<kBits, 4>(args, t, m);
            break;
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Buffered path: unpack (tile, block) once, then register-blocked micro-kernels over the rows.

// Native float: wf[k][16] = scale * (code - zero), the reference's dequantized weight.
template <int kBits>
void UnpackFloatBlock(const WeightView& w, int64_t tile, const KBlock& b, const GroupParams& gp,
                      float* wf) {
  constexpr int kSB = 32 * kBits;
  const uint8_t* sb = w.B + (tile * (w.fmt.k_stored() / kKAlign) + b.offset / kKAlign) * kSB;
  float32x4_t zb[4] = {};
  QX_UNROLL
  for (int q = 0; q < 4; ++q) zb[q] = ZeroBias(gp.zero[q]);
  for (int64_t k = 0; k < b.length; k += kKAlign, sb += kSB) {
    const Tile16Reader<kBits> rd(sb);
    float* dst = wf + k * kTileN;
    QX_UNROLL
    for (int q = 0; q < 4; ++q) {
      uint8x16_t u[4];
      rd.Quarter(q, u);
      QX_UNROLL
      for (int s = 0; s < 4; ++s) {
        float32x4_t x[4];
        CodesToF32(u[s], zb[q], x);
        QX_UNROLL
        for (int r = 0; r < 4; ++r)
          vst1q_f32(dst + (4 * s + r) * kTileN + 4 * q, vmulq_f32(x[r], gp.scale[q]));
      }
    }
  }
}

// Native int8: wi[(k / 4) * 64 + 4c + k % 4] = signed code (see ToS8).
template <int kBits>
void UnpackInt8Block(const WeightView& w, int64_t tile, const KBlock& b, int8_t* wi) {
  constexpr int kSB = 32 * kBits;
  const uint8_t* sb = w.B + (tile * (w.fmt.k_stored() / kKAlign) + b.offset / kKAlign) * kSB;
  for (int64_t k = 0; k < b.length; k += kKAlign, sb += kSB) {
    const Tile16Reader<kBits> rd(sb);
    int8_t* dst = wi + k * kTileN;
    QX_UNROLL
    for (int q = 0; q < 4; ++q) {
      uint8x16_t u[4];
      rd.Quarter(q, u);
      QX_UNROLL
      for (int s = 0; s < 4; ++s) vst1q_s8(dst + 64 * s + 16 * q, ToS8<kBits>(u[s]));
    }
  }
}

// acc[r][c] += sum_k a[r][k] * wf[k][c], R rows x 16 columns in 4R accumulators.
template <int J, int R>
QX_INLINE void FmaLane(float32x4_t (&c)[R][4], const float* wk, const float32x4_t (&av)[R]) {
  QX_UNROLL
  for (int q = 0; q < 4; ++q) {
    const float32x4_t wv = vld1q_f32(wk + J * kTileN + 4 * q);
    QX_UNROLL
    for (int r = 0; r < R; ++r) c[r][q] = vfmaq_laneq_f32(c[r][q], wv, av[r], J);
  }
}

template <int R>
void MicroFloat(const float* wf, int64_t L, const float* a, int64_t lda, float* acc) {
  float32x4_t c[R][4];
  QX_UNROLL
  for (int r = 0; r < R; ++r) {
    QX_UNROLL
    for (int q = 0; q < 4; ++q) c[r][q] = vld1q_f32(acc + r * kTileN + 4 * q);
  }
  for (int64_t k = 0; k < L; k += 4) {
    float32x4_t av[R];
    QX_UNROLL
    for (int r = 0; r < R; ++r) av[r] = vld1q_f32(a + r * lda + k);
    const float* wk = wf + k * kTileN;
    FmaLane<0, R>(c, wk, av);
    FmaLane<1, R>(c, wk, av);
    FmaLane<2, R>(c, wk, av);
    FmaLane<3, R>(c, wk, av);
  }
  QX_UNROLL
  for (int r = 0; r < R; ++r) {
    QX_UNROLL
    for (int q = 0; q < 4; ++q) vst1q_f32(acc + r * kTileN + 4 * q, c[r][q]);
  }
}

// Int8 operands of one (tile, block) for the micro-kernel.
struct Int8Block {
  const int8_t* w;  // [L / 4][64] signed values
  int64_t length;
  float32x4_t scale[4];
  int32x4_t zero[4];  // zero point minus the value offset
};

template <class P, int R, int kFold>
void MicroInt8(const Int8Block& blk, const MatMulArgs& args, int64_t m0, int64_t bi,
               const int8_t* a, float* acc) {
  int32x4_t c[R][4][1] = {};
  for (int64_t k = 0; k < blk.length; k += kKAlign) {
    int8x16_t av[R];
    QX_UNROLL
    for (int r = 0; r < R; ++r) av[r] = vld1q_s8(a + r * args.lda + k);
    const int8_t* wk = blk.w + k * kTileN;
    QX_UNROLL
    for (int q = 0; q < 4; ++q) {
      int8x16_t v[4];
      QX_UNROLL
      for (int s = 0; s < 4; ++s) v[s] = vld1q_s8(wk + 64 * s + 16 * q);
      QX_UNROLL
      for (int r = 0; r < R; ++r) P::template SuperBlock<1, kFold>(c[r][q], v, av[r]);
    }
  }
  QX_UNROLL
  for (int r = 0; r < R; ++r) {
    const int32x4_t dot[4] = {c[r][0][0], c[r][1][0], c[r][2][0], c[r][3][0]};
    const int64_t at = (m0 + r) * args.n_blocks + bi;
    Int8Epilogue(dot, blk.zero, blk.scale, args.a_sum[at], args.a_scale[at], acc + r * kTileN);
  }
}

template <class P, int kFold>
void MicroInt8Rows(const Int8Block& blk, const MatMulArgs& args, int64_t m0, int64_t rows,
                   int64_t bi, const int8_t* a, float* acc) {
  constexpr int kR = P::kMicroRows;
  static_assert(kR == 2 || kR == 4, "row blocking of the int8 micro-kernel");
  int64_t r = 0;
  for (; r + kR <= rows; r += kR)
    MicroInt8<P, kR, kFold>(blk, args, m0 + r, bi, a + r * args.lda, acc + r * kTileN);
  const int64_t rest = rows - r;
  if constexpr (kR == 4) {
    if (rest == 3)
      MicroInt8<P, 3, kFold>(blk, args, m0 + r, bi, a + r * args.lda, acc + r * kTileN);
    if (rest == 2)
      MicroInt8<P, 2, kFold>(blk, args, m0 + r, bi, a + r * args.lda, acc + r * kTileN);
  }
  if (rest == 1) MicroInt8<P, 1, kFold>(blk, args, m0 + r, bi, a + r * args.lda, acc + r * kTileN);
}

inline void MicroFloatRows(const float* wf, int64_t L, const float* a, int64_t lda, int64_t rows,
                           float* acc) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) MicroFloat<4>(wf, L, a + r * lda, lda, acc + r * kTileN);
  switch (rows - r) {
    case 0:
      break;
    case 1:
      MicroFloat<1>(wf, L, a + r * lda, lda, acc + r * kTileN);
      break;
    case 2:
      MicroFloat<2>(wf, L, a + r * lda, lda, acc + r * kTileN);
      break;
    default:
      MicroFloat<3>(wf, L, a + r * lda, lda, acc + r * kTileN);
      break;
  }
}

// kBits = 0: not native (ROW layout or codebook), through the portable unpackers.
template <class P, int kBits>
void Buffered(const MatMulArgs& args, int64_t t0, int64_t t1, int64_t r0, int64_t r1) {
  const WeightView& w = *args.w;
  const bool int8 = args.path == ComputePath::kInt8;
  // Portable int8 values are unsigned: uniform codes of <= 6 bits stay as they are (fold as
  // the native codes), others (8-bit codes, codebook values + 128) are shifted by -128.
  const int portable_fold = w.codebook ? 1 : w.fmt.bits <= 4 ? 4 : w.fmt.bits <= 6 ? 2 : 1;
  alignas(64) float acc[kChunkRows * kTileN];
  alignas(64) float wf[kActBlockMax * kTileN];
  alignas(64) int8_t wi[kActBlockMax * kTileN];
  for (int64_t m0 = r0; m0 < r1; m0 += kChunkRows) {
    const int64_t rows = MinI64(kChunkRows, r1 - m0);
    for (int64_t t = t0; t < t1; ++t) {
      std::memset(acc, 0, sizeof(float) * rows * kTileN);
      GroupParams gp{};
      int64_t group = -1;
      for (int64_t bi = 0; bi < args.n_blocks; ++bi) {
        const KBlock& b = args.blocks[bi];
        if constexpr (kBits != 0) {
          if (b.group != group) {
            group = b.group;
            LoadGroupParams<kBits>(w, t, group, &gp);
          }
        }
        if (!int8) {
          if constexpr (kBits != 0)
            UnpackFloatBlock<kBits>(w, t, b, gp, wf);
          else
            DequantTileF32(w, t, b, wf);
          MicroFloatRows(wf, b.length, args.a_f32 + m0 * args.lda + b.offset, args.lda, rows, acc);
          continue;
        }
        Int8Block blk;
        blk.w = wi;
        blk.length = b.length;
        int fold;
        if constexpr (kBits != 0) {
          UnpackInt8Block<kBits>(w, t, b, wi);
          QX_UNROLL
          for (int q = 0; q < 4; ++q) {
            blk.scale[q] = gp.scale[q];
            blk.zero[q] = vsubq_s32(gp.zero[q], vdupq_n_s32(kCodeOffset<kBits>));
          }
          fold = kFoldSteps<kBits>;
        } else {
          alignas(16) float scale[kTileN], zero[kTileN];
          uint8_t* wu = reinterpret_cast<uint8_t*>(wi);
          UnpackTileU8(w, t, b, wu, scale, zero);
          fold = portable_fold;
          const bool shift = fold == 1;
          if (shift) {
            const uint8x16_t flip = vdupq_n_u8(0x80);
            for (int64_t i = 0; i < b.length * kTileN; i += 16)
              vst1q_u8(wu + i, veorq_u8(vld1q_u8(wu + i), flip));
          }
          const float32x4_t off = vdupq_n_f32(shift ? 128.0f : 0.0f);
          QX_UNROLL
          for (int q = 0; q < 4; ++q) {
            blk.scale[q] = vld1q_f32(scale + 4 * q);
            blk.zero[q] = vcvtq_s32_f32(vsubq_f32(vld1q_f32(zero + 4 * q), off));
          }
        }
        const int8_t* a = args.a_i8 + m0 * args.lda + b.offset;
        if (fold == 4)
          MicroInt8Rows<P, 4>(blk, args, m0, rows, bi, a, acc);
        else if (fold == 2)
          MicroInt8Rows<P, 2>(blk, args, m0, rows, bi, a, acc);
        else
          MicroInt8Rows<P, 1>(blk, args, m0, rows, bi, a, acc);
      }
      for (int64_t r = 0; r < rows; ++r) StoreRow(args, m0 + r, t, acc + r * kTileN);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Table entries

// Every uniform-grid TILE16 weight is native: bits 2, 3, 4, 5, 6 and 8 (7 is not a format).
inline bool IsNative(const WeightView& w, ComputePath) {
  return w.fmt.layout == Layout::kTile16 && !w.codebook;
}

template <class P>
void MatMul(const MatMulArgs& args, int64_t t0, int64_t t1, int64_t r0, int64_t r1) {
  if (t0 >= t1 || r0 >= r1) return;
  const WeightView& w = *args.w;
  const bool native = IsNative(w, args.path);
  if (native && r1 - r0 <= kFusedRowsMax) {
    switch (w.fmt.bits) {
      case 2:
        Fused<P, 2>(args, t0, t1, r0, r1);
        return;
      case 3:
        Fused<P, 3>(args, t0, t1, r0, r1);
        return;
      case 4:
        Fused<P, 4>(args, t0, t1, r0, r1);
        return;
      case 5:
        Fused<P, 5>(args, t0, t1, r0, r1);
        return;
      case 6:
        Fused<P, 6>(args, t0, t1, r0, r1);
        return;
      default:
        Fused<P, 8>(args, t0, t1, r0, r1);
        return;
    }
  }
  switch (native ? w.fmt.bits : 0) {
    case 2:
      Buffered<P, 2>(args, t0, t1, r0, r1);
      return;
    case 3:
      Buffered<P, 3>(args, t0, t1, r0, r1);
      return;
    case 4:
      Buffered<P, 4>(args, t0, t1, r0, r1);
      return;
    case 5:
      Buffered<P, 5>(args, t0, t1, r0, r1);
      return;
    case 6:
      Buffered<P, 6>(args, t0, t1, r0, r1);
      return;
    case 8:
      Buffered<P, 8>(args, t0, t1, r0, r1);
      return;
    default:
      Buffered<P, 0>(args, t0, t1, r0, r1);
      return;
  }
}

// Bit-exact with QuantizeActivationsPortable: fmaxnm = fmax (NaN ignored), the same fp32
// multiply by inv = 127 / peak, fcvtns = round to nearest even (nearbyint in the default mode).
inline void QuantizeActivations(const float* a, int64_t M, int64_t lda, const KBlock* blocks,
                                int64_t n_blocks, int8_t* q, float* scale, int32_t* sum) {
  for (int64_t m = 0; m < M; ++m) {
    const float* row = a + m * lda;
    int8_t* qrow = q + m * lda;
    for (int64_t bi = 0; bi < n_blocks; ++bi) {
      const KBlock& b = blocks[bi];
      const float* x = row + b.offset;
      int8_t* y = qrow + b.offset;
      const int64_t L = b.length;
      float32x4_t vmax = vdupq_n_f32(0.0f);
      int64_t k = 0;
      for (; k + 4 <= L; k += 4) vmax = vmaxnmq_f32(vmax, vabsq_f32(vld1q_f32(x + k)));
      float peak = vmaxnmvq_f32(vmax);
      for (; k < L; ++k) peak = std::fmax(peak, std::fabs(x[k]));
      const float inv = peak > 0.0f ? 127.0f / peak : 0.0f;
      int32x4_t vsum = vdupq_n_s32(0);
      k = 0;
      for (; k + 16 <= L; k += 16) {
        int32x4_t i[4];
        QX_UNROLL
        for (int j = 0; j < 4; ++j)
          i[j] = vcvtnq_s32_f32(vmulq_n_f32(vld1q_f32(x + k + 4 * j), inv));
        vsum = vaddq_s32(vsum, vaddq_s32(vaddq_s32(i[0], i[1]), vaddq_s32(i[2], i[3])));
        const int16x8_t h0 = vcombine_s16(vmovn_s32(i[0]), vmovn_s32(i[1]));
        const int16x8_t h1 = vcombine_s16(vmovn_s32(i[2]), vmovn_s32(i[3]));
        vst1q_s8(y + k, vcombine_s8(vmovn_s16(h0), vmovn_s16(h1)));
      }
      int32_t s = vaddvq_s32(vsum);
      for (; k < L; ++k) {
        const int v = static_cast<int>(std::nearbyint(x[k] * inv));
        y[k] = static_cast<int8_t>(v);
        s += v;
      }
      scale[m * n_blocks + bi] = peak / 127.0f;
      sum[m * n_blocks + bi] = s;
    }
  }
}

// Read-bandwidth roofline (KernelTable::stream_read): 64 bytes per ld1 {4 x 16B}, added as
// uint64 lanes into 4 accumulators; the checksum equals StreamReadPortable's.
inline uint64_t StreamRead(const uint8_t* p, int64_t bytes) {
  uint64x2_t acc[4] = {};
  for (int64_t i = 0; i + 64 <= bytes; i += 64) {
    const uint8x16x4_t v = vld1q_u8_x4(p + i);
    QX_UNROLL
    for (int j = 0; j < 4; ++j) acc[j] = vaddq_u64(acc[j], vreinterpretq_u64_u8(v.val[j]));
  }
  const uint64x2_t x = veorq_u64(veorq_u64(acc[0], acc[1]), veorq_u64(acc[2], acc[3]));
  return vgetq_lane_u64(x, 0) ^ vgetq_lane_u64(x, 1);
}

}  // namespace QX_NEON_NS
}  // namespace quantx

#undef QX_INLINE
#undef QX_UNROLL
#undef QX_NO_UNROLL

#endif  // defined(__aarch64__)
