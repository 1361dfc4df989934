// AVX-512 kernels (F + BW + VL + VNNI; Ice Lake / Sapphire Rapids / Zen 4 and later).
//
// Why TILE16 suits AVX-512: a TILE16 super-block (16 columns x 16 k) is exactly four zmm of
// byte lanes in vpdpbusd order (lane 4c + r holds column c at k = 4s + r), so
//  - 2-bit: one 64-byte load gives all four steps: (plane >> 2s) & 3 (vpsrlw + vpandd);
//  - 3-bit: the same, plus one 64-bit mask per step loaded straight into a k-register (kmovq)
//    that adds 4 to exactly the lanes whose high bit is set (masked vpaddb): no bit shuffling;
//  - 4-bit: two loads, nibbles by vpandd / vpsrlw; 8-bit: plain loads;
//  - 5- and 6-bit: the 4-bit nibbles, then bit 4 from a k-mask (masked vpaddb) or bits 4-5
//    from a 2-bit plane (one shift and a vpternlogd per step);
// and vpdpbusd multiplies the unsigned codes by int8 activations broadcast four at a time,
// accumulating one int32 per column: no horizontal reductions anywhere. Zero points and
// hierarchical sub-scales (16 packed values per tile and group) expand with two pdep (BMI2).
//
// Paths: int8 activations (accuracy_level 4) use vpdpbusd; decode (<= 4 rows) unpacks in
// registers and streams the weights once; prefill unpacks each tile once into an L1/L2 buffer
// and runs an 8-row register-blocked microkernel over the whole tile per chunk of rows. Float
// activations dequantize each (tile, block) to a [k][16] float buffer for an FMA microkernel.
// Layouts or grids this file does not read natively (ROW, codebooks) go through the portable
// unpackers into the same buffers.
#include "quantx/kernels.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)

#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "attention_avx2.h"
#include "decode.h"
#include "hadamard_simd.h"
#include "portable.h"

#ifndef QX_PREFETCH
#define QX_PREFETCH 2048
#endif
#ifndef QX_PARAM_PREFETCH
#define QX_PARAM_PREFETCH 1
#endif

namespace quantx {
namespace {

constexpr int kDecodeRowsMax = 4;
constexpr int kMicroRows = 8;
constexpr int kPrefetchBytes = QX_PREFETCH;

// ---------------------------------------------------------------------------------------------
// Per (tile, group) parameters.

// 16 values of `bits` bits (<= 8) from a 2*bits-byte LSB-first stream, as 16 bytes. Reads
// exactly 2*bits bytes, straight from the tensor (a copy through a stack buffer would stall on
// store forwarding).
template <int kBits>
__attribute__((always_inline)) inline __m128i Unpack16(const uint8_t* p) {
  if constexpr (kBits == 8) {
    return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  } else {
    uint64_t x = 0;
    if constexpr (kBits >= 4) {
      std::memcpy(&x, p, 8);
    } else {
      uint32_t lo32;
      std::memcpy(&lo32, p, 4);
      x = lo32;
      if constexpr (kBits == 3) {
        uint16_t hi16;
        std::memcpy(&hi16, p + 4, 2);
        x |= static_cast<uint64_t>(hi16) << 32;
      }
    }
    uint64_t x_hi = x >> (8 * kBits);  // values 8..15
    if constexpr (kBits > 4) {  // 16 * kBits > 64: the rest of the stream
      uint64_t rest = 0;
      std::memcpy(&rest, p + 8, 2 * kBits - 8);
      x_hi |= rest << (64 - 8 * kBits);
    }
    const uint64_t mask = ((1ull << kBits) - 1) * 0x0101010101010101ull;
    return _mm_set_epi64x(static_cast<int64_t>(_pdep_u64(x_hi, mask)),
                          static_cast<int64_t>(_pdep_u64(x, mask)));
  }
}

// The same for a run-time bit count (hierarchical sub-scales).
inline __m128i Unpack16Any(const uint8_t* p, int bits) {
  switch (bits) {
    case 2: return Unpack16<2>(p);
    case 3: return Unpack16<3>(p);
    case 4: return Unpack16<4>(p);
    case 5: return Unpack16<5>(p);
    case 6: return Unpack16<6>(p);
    case 7: return Unpack16<7>(p);
    default: return Unpack16<8>(p);
  }
}

inline __m512 BytesToFloat(__m128i v) { return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(v)); }

struct GroupParams {
  __m512 scale;       // effective scale per column
  __m512 zero;        // zero point per column (as float)
  __m512 scale_zero;  // scale * zero
};

// Per-tile pointers to the scales, zero points and sub-scales of each group.
template <int kBits>
struct ParamCursor {
  const uint16_t* scales16 = nullptr;
  const float* scales32 = nullptr;
  const uint8_t* zero_points = nullptr;
  const uint8_t* sub_scales = nullptr;
  int scale_bits = 0, super_group = 1;

  ParamCursor(const WeightView& w, int64_t tile) {
    const WeightFormat& f = w.fmt;
    const int64_t G = f.n_groups();
    const int64_t n_scales = f.scale_bits ? f.n_super() : G;
    if (w.scales_f16)
      scales16 = static_cast<const uint16_t*>(w.scales) + tile * n_scales * kTileN;
    else
      scales32 = static_cast<const float*>(w.scales) + tile * n_scales * kTileN;
    if (w.zero_points) zero_points = w.zero_points + tile * G * 2 * kBits;
    if (f.scale_bits) {
      sub_scales = w.sub_scales + tile * G * 2 * f.scale_bits;
      scale_bits = f.scale_bits;
      super_group = f.super_group;
    }
  }

  // The scales and zero points of a group a few groups ahead (their streams are separate from
  // the codes', so the prefetch of the code stream does not cover them).
  __attribute__((always_inline)) void Prefetch(int64_t group) const {
#if QX_PARAM_PREFETCH
    const int64_t ahead = group + 8;
    const int64_t sg = scale_bits ? ahead / super_group : ahead;
    _mm_prefetch(reinterpret_cast<const char*>(scales16 ? static_cast<const void*>(scales16 + sg * kTileN)
                                                        : static_cast<const void*>(scales32 + sg * kTileN)),
                 _MM_HINT_T0);
    if (zero_points) _mm_prefetch(reinterpret_cast<const char*>(zero_points + ahead * 2 * kBits), _MM_HINT_T0);
#else
    (void)group;
#endif
  }

  __attribute__((always_inline)) GroupParams Get(int64_t group) const {
    const int64_t sg = scale_bits ? group / super_group : group;
    GroupParams p;
    p.scale = scales16 ? _mm512_cvtph_ps(_mm256_loadu_si256(
                             reinterpret_cast<const __m256i*>(scales16 + sg * kTileN)))
                       : _mm512_loadu_ps(scales32 + sg * kTileN);
    if (scale_bits) {
      const __m128i sub = Unpack16Any(sub_scales + group * 2 * scale_bits, scale_bits);
      p.scale = _mm512_mul_ps(p.scale, _mm512_add_ps(BytesToFloat(sub), _mm512_set1_ps(1.0f)));
    }
    p.zero = zero_points ? BytesToFloat(Unpack16<kBits>(zero_points + group * 2 * kBits))
                         : _mm512_set1_ps(static_cast<float>(1 << (kBits - 1)));
    p.scale_zero = _mm512_mul_ps(p.scale, p.zero);
    return p;
  }
};

// Portable parameters (any layout or grid) as vectors.
GroupParams PortableParams(const float* scale, const float* zero) {
  GroupParams p;
  p.scale = _mm512_loadu_ps(scale);
  p.zero = _mm512_loadu_ps(zero);
  p.scale_zero = _mm512_mul_ps(p.scale, p.zero);
  return p;
}

// ---------------------------------------------------------------------------------------------
// One TILE16 super-block -> four vectors of unsigned codes in vpdpbusd lane order.
template <int kBits>
inline void UnpackSuperblock(const uint8_t* sb, __m512i w[4]) {
  if constexpr (kBits == 8) {
    for (int s = 0; s < 4; ++s) w[s] = _mm512_loadu_si512(sb + 64 * s);
  } else if constexpr (kBits >= 4) {
    const __m512i lo4 = _mm512_set1_epi8(0x0f);
    const __m512i a = _mm512_loadu_si512(sb), b = _mm512_loadu_si512(sb + 64);
    w[0] = _mm512_and_si512(a, lo4);
    w[1] = _mm512_and_si512(_mm512_srli_epi16(a, 4), lo4);
    w[2] = _mm512_and_si512(b, lo4);
    w[3] = _mm512_and_si512(_mm512_srli_epi16(b, 4), lo4);
    if constexpr (kBits == 5) {
      // bit 4: one mask per step, as 3-bit's bit 2; added to exactly its lanes
      const __m512i sixteen = _mm512_set1_epi8(16);
      for (int s = 0; s < 4; ++s) {
        uint64_t bits;
        std::memcpy(&bits, sb + 128 + 8 * s, 8);
        w[s] = _mm512_mask_add_epi8(w[s], _cvtu64_mask64(bits), w[s], sixteen);
      }
    } else if constexpr (kBits == 6) {
      // bits 4-5: a 2-bit plane; step s's pair moved to bits 4-5 by one 16-bit shift (the
      // bits a shift carries across a byte never land on bits 4-5), then (x & 0x30) | w
      const __m512i hi2 = _mm512_set1_epi8(0x30);
      const __m512i plane = _mm512_loadu_si512(sb + 128);
      const __m512i moved[4] = {_mm512_slli_epi16(plane, 4), _mm512_slli_epi16(plane, 2), plane,
                                _mm512_srli_epi16(plane, 2)};
      for (int s = 0; s < 4; ++s) w[s] = _mm512_ternarylogic_epi32(moved[s], hi2, w[s], 0xEA);
    }
  } else {
    const __m512i lo2 = _mm512_set1_epi8(0x03);
    const __m512i plane = _mm512_loadu_si512(sb);
    const __m512i shifted[4] = {plane, _mm512_srli_epi16(plane, 2), _mm512_srli_epi16(plane, 4),
                                _mm512_srli_epi16(plane, 6)};
    if constexpr (kBits == 3) {
      // (shifted & 3) | (mask ? 4 : 0) in one vpternlogd (0xEA = A & B | C)
      const __m512i four = _mm512_set1_epi8(4);
      for (int s = 0; s < 4; ++s) {
        uint64_t bits;
        std::memcpy(&bits, sb + 64 + 8 * s, 8);
        const __m512i high = _mm512_maskz_mov_epi8(_cvtu64_mask64(bits), four);
        w[s] = _mm512_ternarylogic_epi32(shifted[s], lo2, high, 0xEA);
      }
    } else {
      for (int s = 0; s < 4; ++s) w[s] = _mm512_and_si512(shifted[s], lo2);
    }
  }
}

// acc += u8 weights . s8 activations. Inline asm because GCC 12 otherwise copies every
// loop-carried accumulator twice per instruction (it fails to tie vpdpbusd's in/out operand).
__attribute__((always_inline)) inline void Dot4(__m512i& acc, __m512i w, __m512i a) {
  asm("vpdpbusd %[a], %[w], %[acc]" : [acc] "+v"(acc) : [w] "v"(w), [a] "v"(a));
}

// acc += u8 weights . the four int8 activations at p, broadcast to every lane straight from
// memory (embedded broadcast: the load folds into the instruction).
__attribute__((always_inline)) inline void Dot4Mem(__m512i& acc, __m512i w, const int8_t* p) {
  asm("vpdpbusd %[a]%{1to16%}, %[w], %[acc]"
      : [acc] "+v"(acc)
      : [w] "v"(w), [a] "m"(*reinterpret_cast<const int32_t*>(p)));
}

inline __m512i Bcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

inline const uint8_t* TileCodes(const WeightView& w, int64_t tile) {
  return w.B + tile * (w.fmt.k_stored() / kKAlign) * w.fmt.superblock_bytes();
}

// Writes acc + bias into row m, columns of `tile` (masked for the last, partial tile).
inline void StoreRow(const MatMulArgs& args, int64_t m, int64_t tile, __m512 acc) {
  const int64_t n0 = tile * kTileN;
  const int64_t count = std::min<int64_t>(kTileN, args.w->fmt.N - n0);
  const __mmask16 mask = static_cast<__mmask16>((1u << count) - 1u);
  if (args.bias) acc = _mm512_add_ps(acc, _mm512_maskz_loadu_ps(mask, args.bias + n0));
  _mm512_mask_storeu_ps(args.y + m * args.ldy + n0, mask, acc);
}

// y += scale * sa * (dot - zero * isum). The bracket is computed exactly (integers below 2^24,
// one rounding of an exact result), so nothing cancels catastrophically.
inline __m512 Int8Epilogue(__m512 y, __m512i dot, const GroupParams& p, float sa, int32_t isum) {
  const __m512 d =
      _mm512_fnmadd_ps(p.zero, _mm512_set1_ps(static_cast<float>(isum)), _mm512_cvtepi32_ps(dot));
  return _mm512_fmadd_ps(_mm512_mul_ps(p.scale, _mm512_set1_ps(sa)), d, y);
}

// ---------------------------------------------------------------------------------------------
// Int8 decode: up to 4 rows, weights unpacked in registers and streamed once.
template <int kBits, int kRows>
void Int8DecodeTiles(const MatMulArgs& args, int64_t t0, int64_t t1, int64_t m0) {
  const WeightView& w = *args.w;
  const int64_t sb_bytes = 32 * kBits;
  const int64_t nb = args.n_blocks;
  for (int64_t t = t0; t < t1; ++t) {
    const uint8_t* codes = TileCodes(w, t);
    const ParamCursor<kBits> params(w, t);
    __m512 y[kRows];
    for (int r = 0; r < kRows; ++r) y[r] = _mm512_setzero_ps();
    GroupParams p{};
    int64_t group = -1;
    for (int64_t bi = 0; bi < nb; ++bi) {
      const KBlock& b = args.blocks[bi];
      if (b.group != group) {
        group = b.group;
        p = params.Get(group);
        params.Prefetch(group);
      }
      // four accumulators per row (one per k4-step) keep the vpdpbusd chains short
      __m512i acc[kRows][4];
#pragma GCC unroll 4
      for (int r = 0; r < kRows; ++r)
#pragma GCC unroll 4
        for (int s = 0; s < 4; ++s) acc[r][s] = _mm512_setzero_si512();
      const uint8_t* sb = codes + (b.offset / kKAlign) * sb_bytes;
      const int8_t* a = args.a_i8 + m0 * args.lda + b.offset;
      for (int64_t k = 0; k < b.length; k += 16, sb += sb_bytes) {
        // the hardware prefetcher alone falls behind when each line also costs compute
        _mm_prefetch(reinterpret_cast<const char*>(sb) + kPrefetchBytes, _MM_HINT_T0);
        if constexpr (kBits >= 3)
          _mm_prefetch(reinterpret_cast<const char*>(sb) + kPrefetchBytes + 64, _MM_HINT_T0);
        if constexpr (kBits >= 5)
          _mm_prefetch(reinterpret_cast<const char*>(sb) + kPrefetchBytes + 128, _MM_HINT_T0);
        __m512i wv[4];
        UnpackSuperblock<kBits>(sb, wv);
#pragma GCC unroll 4
        for (int r = 0; r < kRows; ++r)
#pragma GCC unroll 4
          for (int s = 0; s < 4; ++s)
            Dot4Mem(acc[r][s], wv[s], a + r * args.lda + k + 4 * s);
      }
      for (int r = 0; r < kRows; ++r) {
        const __m512i dot = _mm512_add_epi32(_mm512_add_epi32(acc[r][0], acc[r][1]),
                                             _mm512_add_epi32(acc[r][2], acc[r][3]));
        const int64_t idx = (m0 + r) * nb + bi;
        y[r] = Int8Epilogue(y[r], dot, p, args.a_scale[idx], args.a_sum[idx]);
      }
    }
    for (int r = 0; r < kRows; ++r) StoreRow(args, m0 + r, t, y[r]);
  }
}

template <int kBits>
void Int8Decode(const MatMulArgs& args, int64_t t0, int64_t t1, int64_t m0, int64_t rows) {
  switch (rows) {
    case 1: return Int8DecodeTiles<kBits, 1>(args, t0, t1, m0);
    case 2: return Int8DecodeTiles<kBits, 2>(args, t0, t1, m0);
    case 3: return Int8DecodeTiles<kBits, 3>(args, t0, t1, m0);
    default: return Int8DecodeTiles<kBits, 4>(args, t0, t1, m0);
  }
}

// ---------------------------------------------------------------------------------------------
// Int8 prefill: a (tile, block) is unpacked once into `wbuf` ([steps][64] bytes) and reused
// by every row.
template <int kBits>
void UnpackBlockU8(const uint8_t* sb, int64_t length, uint8_t* wbuf) {
  for (int64_t k = 0; k < length; k += 16, sb += 32 * kBits, wbuf += 256) {
    __m512i wv[4];
    UnpackSuperblock<kBits>(sb, wv);
    for (int s = 0; s < 4; ++s) _mm512_store_si512(wbuf + 64 * s, wv[s]);
  }
}

// Per (tile, block) parameters of the prefill: the block's scale and zero point per column,
// read by every row chunk.
struct BlockParams {
  __m512 scale, zero;
};

// R rows x 16 columns over a whole tile: `wbuf` holds the tile's unpacked codes (64 bytes per
// k4-step, blocks in stored-k order), `params` each block's scale and zero. The row sums y
// stay in registers over all blocks, and per (row, block) the epilogue is four instructions:
// y += (scale * sa) * (dot - zero * isum), sa and isum broadcast from memory (isum as float,
// exact below 2^24). The accumulators must stay local to this function: passed by pointer,
// GCC spills them to the stack after every vpdpbusd.
template <int R>
void Int8RowsTile(const MatMulArgs& args, const uint8_t* wbuf, const BlockParams* params,
                  const float* isum, int64_t m, int64_t tile) {
  __m512 y[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) y[r] = _mm512_setzero_ps();
  const int64_t lda = args.lda, nb = args.n_blocks;
  for (int64_t bi = 0; bi < nb; ++bi) {
    const KBlock& b = args.blocks[bi];
    const uint8_t* wb = wbuf + b.offset * 16;
    const int8_t* a = args.a_i8 + m * lda + b.offset;
    __m512i acc[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_si512();
    const int64_t steps = b.length / 4;
    for (int64_t q = 0; q < steps; ++q) {
      const __m512i wv = _mm512_load_si512(wb + 64 * q);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) Dot4Mem(acc[r], wv, a + r * lda + 4 * q);
    }
    const __m512 scale = params[bi].scale, zero = params[bi].zero;
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const int64_t idx = (m + r) * nb + bi;
      const __m512 d =
          _mm512_fnmadd_ps(zero, _mm512_set1_ps(isum[idx]), _mm512_cvtepi32_ps(acc[r]));
      y[r] = _mm512_fmadd_ps(_mm512_mul_ps(scale, _mm512_set1_ps(args.a_scale[idx])), d, y[r]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) StoreRow(args, m + r, tile, y[r]);
}

void Int8RowsTileAny(const MatMulArgs& args, const uint8_t* wbuf, const BlockParams* params,
                     const float* isum, int64_t m, int64_t rows, int64_t tile) {
  for (; rows >= kMicroRows; rows -= kMicroRows, m += kMicroRows)
    Int8RowsTile<kMicroRows>(args, wbuf, params, isum, m, tile);
  switch (rows) {
    case 7: return Int8RowsTile<7>(args, wbuf, params, isum, m, tile);
    case 6: return Int8RowsTile<6>(args, wbuf, params, isum, m, tile);
    case 5: return Int8RowsTile<5>(args, wbuf, params, isum, m, tile);
    case 4: return Int8RowsTile<4>(args, wbuf, params, isum, m, tile);
    case 3: return Int8RowsTile<3>(args, wbuf, params, isum, m, tile);
    case 2: return Int8RowsTile<2>(args, wbuf, params, isum, m, tile);
    case 1: return Int8RowsTile<1>(args, wbuf, params, isum, m, tile);
    default: return;
  }
}

// Int8 prefill: each tile is unpacked once into `wbuf` (k_stored x 16 bytes: 9 KB for
// K = 576, in L1; 176 KB for K = 11008, in L2) with its blocks' parameters, then every chunk
// of 8 rows runs over the whole tile. `kBits` = 0: unpack through the portable decoder (any
// layout, codebooks).
template <int kBits>
void Int8Prefill(const MatMulArgs& args, int64_t t0, int64_t t1, int64_t m0, int64_t m1) {
  const WeightView& w = *args.w;
  const int64_t nb = args.n_blocks;
  thread_local std::vector<uint8_t> wbuf_store;
  thread_local std::vector<BlockParams> params_store;
  thread_local std::vector<float> isum_store;
  const size_t wbuf_bytes = static_cast<size_t>(w.fmt.k_stored() * kTileN) + 64;
  if (wbuf_store.size() < wbuf_bytes) wbuf_store.resize(wbuf_bytes);
  uint8_t* wbuf = reinterpret_cast<uint8_t*>(
      (reinterpret_cast<uintptr_t>(wbuf_store.data()) + 63) & ~uintptr_t{63});
  if (params_store.size() < static_cast<size_t>(nb)) params_store.resize(static_cast<size_t>(nb));
  BlockParams* params = params_store.data();
  // the rows' activation sums as floats, once per call
  const size_t n_sums = static_cast<size_t>(m1 * nb);
  if (isum_store.size() < n_sums) isum_store.resize(n_sums);
  float* isum = isum_store.data();
  for (int64_t i = m0 * nb; i < m1 * nb; ++i) isum[i] = static_cast<float>(args.a_sum[i]);
  alignas(64) float scale[kTileN], zero[kTileN];
  for (int64_t t = t0; t < t1; ++t) {
    const uint8_t* codes = kBits ? TileCodes(w, t) : nullptr;
    const ParamCursor<kBits ? kBits : 8> cursor(w, t);
    GroupParams p{};
    int64_t group = -1;
    for (int64_t bi = 0; bi < nb; ++bi) {
      const KBlock& b = args.blocks[bi];
      uint8_t* wb = wbuf + b.offset * 16;
      if constexpr (kBits != 0) {
        if (b.group != group) {
          group = b.group;
          p = cursor.Get(group);
        }
        UnpackBlockU8<kBits>(codes + (b.offset / kKAlign) * 32 * kBits, b.length, wb);
      } else {
        UnpackTileU8(w, t, b, wb, scale, zero);
        p = PortableParams(scale, zero);
      }
      params[bi] = {p.scale, p.zero};
    }
    Int8RowsTileAny(args, wbuf, params, isum, m0, m1 - m0, t);
  }
}

// ---------------------------------------------------------------------------------------------
// Float path: dequantize a (tile, block) to [k][16] floats, FMA microkernel over rows.

// Byte order (c, r) -> (r, c) inside each 128-bit lane, then dwords regrouped so that the
// 16 bytes of quarter r hold columns 0..15 at k = 4s + r.
inline __m512i LanesToColumns(__m512i v) {
  const __m512i shuf = _mm512_broadcast_i32x4(
      _mm_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15));
  const __m512i perm = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_epi32(perm, _mm512_shuffle_epi8(v, shuf));
}

template <int kBits>
void DequantBlockF32(const uint8_t* sb, int64_t length, const GroupParams& p, float* out) {
  alignas(64) uint8_t cols[64];
  for (int64_t k = 0; k < length; k += 16, sb += 32 * kBits) {
    __m512i wv[4];
    UnpackSuperblock<kBits>(sb, wv);
    for (int s = 0; s < 4; ++s) {
      _mm512_store_si512(cols, LanesToColumns(wv[s]));
      for (int r = 0; r < 4; ++r) {
        const __m512 q = BytesToFloat(_mm_load_si128(reinterpret_cast<const __m128i*>(cols + 16 * r)));
        _mm512_store_ps(out + (k + 4 * s + r) * kTileN, _mm512_mul_ps(_mm512_sub_ps(q, p.zero), p.scale));
      }
    }
  }
}

template <int R>
void F32Rows(const float* wbuf, int64_t length, const float* a, int64_t lda, float* y) {
  __m512 acc[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) acc[r] = _mm512_load_ps(y + r * kTileN);
  for (int64_t k = 0; k < length; ++k) {
    const __m512 wv = _mm512_load_ps(wbuf + k * kTileN);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(a[r * lda + k]), wv, acc[r]);
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) _mm512_store_ps(y + r * kTileN, acc[r]);
}

void F32RowsAny(const float* wbuf, int64_t length, const float* a, int64_t lda, int64_t rows,
                float* y) {
  for (; rows >= kMicroRows; rows -= kMicroRows, a += kMicroRows * lda, y += kMicroRows * kTileN)
    F32Rows<kMicroRows>(wbuf, length, a, lda, y);
  switch (rows) {
    case 7: return F32Rows<7>(wbuf, length, a, lda, y);
    case 6: return F32Rows<6>(wbuf, length, a, lda, y);
    case 5: return F32Rows<5>(wbuf, length, a, lda, y);
    case 4: return F32Rows<4>(wbuf, length, a, lda, y);
    case 3: return F32Rows<3>(wbuf, length, a, lda, y);
    case 2: return F32Rows<2>(wbuf, length, a, lda, y);
    case 1: return F32Rows<1>(wbuf, length, a, lda, y);
    default: return;
  }
}

template <int kBits>
void F32MatMul(const MatMulArgs& args, int64_t t0, int64_t t1, int64_t m0, int64_t m1) {
  const WeightView& w = *args.w;
  const int64_t rows = m1 - m0;
  std::vector<float> ybuf_store(static_cast<size_t>(rows * kTileN + 16));
  float* ybuf = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(ybuf_store.data()) + 63) &
                                         ~uintptr_t{63});
  alignas(64) float wbuf[kActBlockMax * kTileN];
  for (int64_t t = t0; t < t1; ++t) {
    std::fill(ybuf, ybuf + rows * kTileN, 0.0f);
    const uint8_t* codes = kBits ? TileCodes(w, t) : nullptr;
    const ParamCursor<kBits ? kBits : 8> params(w, t);
    GroupParams p{};
    int64_t group = -1;
    for (int64_t bi = 0; bi < args.n_blocks; ++bi) {
      const KBlock& b = args.blocks[bi];
      if constexpr (kBits != 0) {
        if (b.group != group) {
          group = b.group;
          p = params.Get(group);
        }
        DequantBlockF32<kBits>(codes + (b.offset / kKAlign) * 32 * kBits, b.length, p, wbuf);
      } else {
        DequantTileF32(w, t, b, wbuf);
      }
      F32RowsAny(wbuf, b.length, args.a_f32 + m0 * args.lda + b.offset, args.lda, rows, ybuf);
    }
    for (int64_t r = 0; r < rows; ++r) StoreRow(args, m0 + r, t, _mm512_load_ps(ybuf + r * kTileN));
  }
}

// ---------------------------------------------------------------------------------------------
template <int kBits>
void MatMulBits(const MatMulArgs& args, int64_t t0, int64_t t1, int64_t m0, int64_t m1) {
  if (args.path == ComputePath::kFloat) return F32MatMul<kBits>(args, t0, t1, m0, m1);
  if constexpr (kBits != 0) {
    if (m1 - m0 <= kDecodeRowsMax) return Int8Decode<kBits>(args, t0, t1, m0, m1 - m0);
  }
  return Int8Prefill<kBits>(args, t0, t1, m0, m1);
}

void MatMulAvx512(const MatMulArgs& args, int64_t t0, int64_t t1, int64_t m0, int64_t m1) {
  const WeightView& w = *args.w;
  const bool native = w.fmt.layout == Layout::kTile16 && !w.codebook;
  switch (native ? w.fmt.bits : 0) {
    case 2: return MatMulBits<2>(args, t0, t1, m0, m1);
    case 3: return MatMulBits<3>(args, t0, t1, m0, m1);
    case 4: return MatMulBits<4>(args, t0, t1, m0, m1);
    case 5: return MatMulBits<5>(args, t0, t1, m0, m1);
    case 6: return MatMulBits<6>(args, t0, t1, m0, m1);
    case 8: return MatMulBits<8>(args, t0, t1, m0, m1);
    default: return MatMulBits<0>(args, t0, t1, m0, m1);
  }
}

// Bit-exact with QuantizeActivationsPortable: max is order-independent, and a * inv rounds
// the same way before vcvtps2dq rounds half to even (default MXCSR).
void QuantizeActivationsAvx512(const float* a, int64_t M, int64_t lda, const KBlock* blocks,
                               int64_t n_blocks, int8_t* q, float* scale, int32_t* sum) {
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t bi = 0; bi < n_blocks; ++bi) {
      const KBlock& b = blocks[bi];
      const float* src = a + m * lda + b.offset;
      __m512 peak = _mm512_setzero_ps();
      for (int64_t k = 0; k < b.length; k += 16)
        peak = _mm512_max_ps(peak, _mm512_abs_ps(_mm512_loadu_ps(src + k)));
      const float pk = _mm512_reduce_max_ps(peak);
      const float inv = pk > 0.0f ? 127.0f / pk : 0.0f;
      const __m512 vinv = _mm512_set1_ps(inv);
      __m512i total = _mm512_setzero_si512();
      int8_t* dst = q + m * lda + b.offset;
      for (int64_t k = 0; k < b.length; k += 16) {
        const __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(src + k), vinv));
        total = _mm512_add_epi32(total, v);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + k), _mm512_cvtepi32_epi8(v));
      }
      scale[m * n_blocks + bi] = pk / 127.0f;
      sum[m * n_blocks + bi] = _mm512_reduce_add_epi32(total);
    }
  }
}

bool Avx512Native(const WeightView& w, ComputePath) {
  return w.fmt.layout == Layout::kTile16 && !w.codebook;
}

uint64_t StreamReadAvx512(const uint8_t* p, int64_t bytes) {
  __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 256 <= bytes; i += 256) {
    a0 = _mm512_add_epi64(a0, _mm512_loadu_si512(p + i));
    a1 = _mm512_add_epi64(a1, _mm512_loadu_si512(p + i + 64));
    a2 = _mm512_add_epi64(a2, _mm512_loadu_si512(p + i + 128));
    a3 = _mm512_add_epi64(a3, _mm512_loadu_si512(p + i + 192));
  }
  for (; i + 64 <= bytes; i += 64) a0 = _mm512_add_epi64(a0, _mm512_loadu_si512(p + i));
  // Fold the lanes as unsigned (the checksum equals StreamReadPortable's). Not with
  // _mm512_reduce_add_epi64: it adds as signed long long, which overflows on arbitrary data.
  alignas(64) uint64_t lanes[8];
  _mm512_store_si512(lanes, _mm512_add_epi64(_mm512_add_epi64(a0, a1), _mm512_add_epi64(a2, a3)));
  uint64_t checksum = 0;
  for (uint64_t lane : lanes) checksum ^= lane;
  return checksum;
}

// The vector moves of the Hadamard transform (hadamard_simd.h) on zmm.
struct Avx512HadamardOps {
  static constexpr int kLanes = 16;
  using Vec = __m512;
  static Vec Load(const float* p) { return _mm512_loadu_ps(p); }
  static void Store(float* p, Vec v) { _mm512_storeu_ps(p, v); }
  template <int h>
  static Vec Swap(Vec v) {
    if constexpr (h == 1) return _mm512_permute_ps(v, 0xB1);  // [1, 0, 3, 2] in each 128 bits
    if constexpr (h == 2) return _mm512_permute_ps(v, 0x4E);  // [2, 3, 0, 1]
    if constexpr (h == 4) return _mm512_shuffle_f32x4(v, v, 0xB1);  // 128-bit lanes [1, 0, 3, 2]
    return _mm512_shuffle_f32x4(v, v, 0x4E);                         // h == 8: [2, 3, 0, 1]
  }
  static Vec LoadQuads(const float* p, int64_t stride) {
    Vec v = _mm512_castps128_ps512(_mm_loadu_ps(p));
    v = _mm512_insertf32x4(v, _mm_loadu_ps(p + stride), 1);
    v = _mm512_insertf32x4(v, _mm_loadu_ps(p + 2 * stride), 2);
    return _mm512_insertf32x4(v, _mm_loadu_ps(p + 3 * stride), 3);
  }
  static void StoreQuads(float* p, int64_t stride, Vec v) {
    _mm_storeu_ps(p, _mm512_castps512_ps128(v));
    _mm_storeu_ps(p + stride, _mm512_extractf32x4_ps(v, 1));
    _mm_storeu_ps(p + 2 * stride, _mm512_extractf32x4_ps(v, 2));
    _mm_storeu_ps(p + 3 * stride, _mm512_extractf32x4_ps(v, 3));
  }
};

void HadamardAvx512(float* x, int64_t K) { SimdHadamard<Avx512HadamardOps>::Transform(x, K); }

const KernelTable kAvx512 = {"avx512", MatMulAvx512, QuantizeActivationsAvx512, Avx512Native,
                             StreamReadAvx512, HadamardAvx512, AttendDecodeAvx2};

}  // namespace

const KernelTable* Avx512Kernels() { return &kAvx512; }

}  // namespace quantx

#else

namespace quantx {
const KernelTable* Avx512Kernels() { return nullptr; }
}  // namespace quantx

#endif
