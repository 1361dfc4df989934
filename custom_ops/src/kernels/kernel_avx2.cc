// AVX2 kernels: AVX2 + FMA + F16C (+ BMI2, which dispatch requires) only, so the table runs on
// any Haswell or later Intel CPU and any Zen.
//
// Why these instructions suit the TILE16 layout
// ---------------------------------------------
// A TILE16 super-block is 16 columns x 16 k, stored as four k4-steps of 64 byte lanes, lane
// 4c + k%4 holding column c. A ymm register holds 32 lanes, i.e. 8 columns x 4 consecutive k:
// the low 32 bytes of every 64-byte plane block (and the low 32 bits of every 3-bit high mask)
// are columns 0-7, the high halves columns 8-15. A tile is thus two ymm per k4-step, and the
// packed bytes load straight into registers with no shuffle across columns:
//   - Unpacking is lane-wise. 2-bit codes are (plane >> 2s) & 3 (vpsrlw + vpand: the 16-bit
//     shift is harmless because the mask drops what crosses bytes); 4-bit codes are the two
//     nibbles of a plane; 8-bit codes are the bytes. The 3-bit high bit of lane i is bit i of a
//     32-bit mask: vpbroadcastd + vpshufb (mask byte i/8 to lane i) + vpand with 1 << (i%8) +
//     vpcmpeqb make a byte mask, and vpand 4 + vpor merge it with the low two bits. 5- and
//     6-bit codes are a 4-bit layout (the low four bits) plus bit 4 as 3-bit's masks (vpand 16)
//     or bits 4-5 as a 2-bit plane (one 16-bit shift per step moves the pair to bits 4-5, where
//     no bit crossing a byte lands, then vpand 0x30), merged by vpor.
//   - Int8 path: the four k of a column share one 32-bit lane, which is the operand order of
//     vpmaddubsw (u8 code x s8 activation, adjacent pairs summed to int16) followed by vpmaddwd
//     with ones (int16 pairs summed to int32): each int32 lane is one column's dot over 4 k, and
//     a step's four activation bytes are one vpbroadcastd. No horizontal reduction is needed;
//     two ymm accumulators are the tile's 16 output columns.
//     vpmaddubsw saturates its int16 pair sums. Codes <= 15 (2/3/4-bit) keep them below
//     2 * 15 * 128 = 3840, so they are summed in int16 over up to 8 steps (4-bit), 16 (3-bit)
//     or 32 (2-bit) before one vpmaddwd. 5- and 6-bit codes (pairs up to 2 * 63 * 128 = 16128)
//     are summed in int16 over runs of only two steps (32256 < 2^15), each widened into int32
//     accumulators: still cheaper than the sign trick, which costs a vpsignb per row and step.
//     8-bit codes and int8 codebook values (+128) could reach 2 * 255 * 127 > 2^15, so they use
//     the sign trick: w' = value - 128 (vpxor 0x80) as s8, and vpmaddubsw(|w'|, sign(a, w')) =
//     w' * a exactly (|w'| <= 128 and |a| <= 127 bound a pair by 32512); dot = dot' + 128 *
//     sum(a) folds into the zero-point term.
//     dot - zero * sum(a) is formed from exact integers before any scaling, as the reference.
//   - Float path: in the int32 view of a code vector column c is lane c, so (v & 0xff << 8r)
//     holds k = 4s + r of 8 columns after one vpand; vcvtdq2ps makes it code * 2^8r exactly,
//     minus zero * 2^8r gives the exact (code - zero) * 2^8r, and vfmadd231ps meets it with
//     activations pre-scaled by 2^-8r once per call. The scale is applied once per block.
//   - Per-group parameters: vcvtph2ps reads 8 fp16 scales; 16 packed b-bit zero points (or
//     sub-scales) unpack with vpshufb + vpmullw + vpsrlw (pdep would do 8 at a time but is
//     microcoded on Zen 1 and 2).
// Decode (up to 4 rows, memory bound) unpacks each super-block in registers and uses it at
// once, streaming the packed weight exactly once. Prefill (more rows) unpacks a tile chunk by
// chunk (up to 512 k) into an L1 buffer and reuses it for every row with register-blocked
// microkernels. Formats not read natively (ROW layout, codebooks) go through the canonical tiles
// of decode.h (UnpackTileU8, DequantTileF32) and the same prefill microkernels.
//
// Everything here has internal linkage and no std template is instantiated, so no function
// compiled for AVX2 can be merged by the linker into code that other files call.
#include "quantx/kernels.h"

// kernel_avxvnni.cc compiles this file again with QX_AVX_VNNI (and -mavxvnni): the same code
// with every u8 x s8 dot product as one VEX vpdpbusd into int32 (Alder Lake and later Intel
// cores, Sapphire Rapids, Zen 5; not Zen 4), published as the table "avx-vnni".
// The test build QUANTX_AVXVNNI_EVEX (QX_AVXVNNI_EVEX) encodes the same vpdpbusd on ymm as EVEX
// (AVX-512 VNNI + VL), so that CPUs with AVX-512 VNNI but no AVX-VNNI (Zen 4) run this code.
#if defined(QX_AVX_VNNI) && defined(QX_AVXVNNI_EVEX)
#if !defined(__AVX512VNNI__) || !defined(__AVX512VL__)
#define QX_NO_VNNI 1
#endif
#elif defined(QX_AVX_VNNI) && !defined(__AVXVNNI__)
#define QX_NO_VNNI 1  // that build's compiler flags lack AVX-VNNI: no table
#endif
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__) && defined(__BMI2__) && \
    !defined(QX_NO_VNNI)

#include <immintrin.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "attention_avx2.h"
#include "decode.h"
#include "hadamard_simd.h"
#include "portable.h"
#include "quantx/kernels.h"

namespace quantx {
namespace {

constexpr int kMaxSteps = kActBlockMax / 4;  // k4-steps in the longest block
constexpr int kDecodeMaxRows = 4;            // fused in-register path up to this many rows
constexpr int64_t kPrefillRows = 128;        // rows whose tile accumulators stay in L1

inline int64_t MinI64(int64_t a, int64_t b) { return a < b ? a : b; }

inline __m256i Load256(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
inline void Store256(void* p, __m256i v) { _mm256_storeu_si256(static_cast<__m256i*>(p), v); }

// The four bytes at p, in every 32-bit lane (vpbroadcastd).
inline __m256i Broadcast4(const void* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof v);
  return _mm256_set1_epi32(v);
}

// Code generation notes (GCC 12). Small arrays of registers (accumulators per row and half) stay
// in registers only if every loop over them is fully unrolled, hence the many
// `#pragma GCC unroll`. And GCC keeps a second copy of loop accumulators that are used after
// the loop, moving it back on every iteration (or spilling it); an empty asm at the loop exit
// pins each to one register.
inline void Pin(__m256i& v) { asm("" : "+x"(v)); }
inline void Pin(__m256& v) { asm("" : "+x"(v)); }

// A growing, 64-byte aligned buffer (one per thread and use).
class Scratch {
 public:
  Scratch() = default;
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  ~Scratch() { std::free(data_); }
  void* Get(size_t bytes) {
    if (bytes > size_) {
      std::free(data_);
      size_ = (bytes + 63) / 64 * 64;
      data_ = std::aligned_alloc(64, size_);
      if (!data_) std::abort();
    }
    return data_;
  }

 private:
  void* data_ = nullptr;
  size_t size_ = 0;
};

inline float HorizontalMax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

inline int32_t HorizontalSum(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtsi128_si32(s);
}

// ------------------------------------------------------------------------------------------
// Per-(tile, group) parameters, two ymm per quantity (columns 0-7, 8-15).
struct GroupParams {
  __m256 scale[2];
  __m256 zero[2];  // in signed mode (sign trick) the zero point minus 128
};

// The N (<= 8) little-endian bytes at p, read without touching the bytes after them and with
// loads of 1, 2, 4 or 8 bytes (a memcpy of 3 or 6 bytes would go through the stack and stall
// on store forwarding).
template <int N>
inline uint64_t LoadLittleEndian(const uint8_t* p) {
  uint64_t v = 0;
  if constexpr (N == 8) {
    std::memcpy(&v, p, 8);
  } else {
    int at = 0;
    if constexpr ((N & 4) != 0) {
      uint32_t x;
      std::memcpy(&x, p, 4);
      v = x;
      at = 4;
    }
    if constexpr ((N & 2) != 0) {
      uint16_t x;
      std::memcpy(&x, p + at, 2);
      v |= static_cast<uint64_t>(x) << (8 * at);
      at += 2;
    }
    if constexpr ((N & 1) != 0) v |= static_cast<uint64_t>(p[at]) << (8 * at);
  }
  return v;
}

// Shuffle and multipliers that unpack 16 LSB-first kBits-bit values: int16 lane i gathers the
// two bytes holding bits [kBits * i, kBits * i + kBits), and multiplying by 2^(8 - first bit
// in the byte) puts the value at bit 8 (AVX2 has no variable 16-bit shift).
template <int kBits>
struct Packed16Tables {
  alignas(32) int8_t shuffle[32] = {};
  alignas(32) int16_t multiplier[16] = {};
  constexpr Packed16Tables() {
    for (int i = 0; i < 16; ++i) {
      const int bit = kBits * i, byte = bit / 8;
      shuffle[2 * i] = static_cast<int8_t>(byte);
      shuffle[2 * i + 1] = static_cast<int8_t>(byte + 1 < 16 ? byte + 1 : -128);
      multiplier[i] = static_cast<int16_t>(1 << (8 - bit % 8));
    }
  }
};
template <int kBits>
constexpr Packed16Tables<kBits> kPacked16{};

// 16 LSB-first kBits-bit values (2 * kBits bytes at p) as 16 uint16 lanes. (pdep would do 8 at
// a time, but is microcoded and slow on Zen 1 and 2.)
template <int kBits>
inline __m256i UnpackPacked16(const uint8_t* p) {
  constexpr int kBytes = 2 * kBits;
  uint64_t hi = 0;
  if constexpr (kBytes > 8) hi = LoadLittleEndian<kBytes - 8>(p + 8);
  const uint64_t lo = LoadLittleEndian<(kBytes < 8 ? kBytes : 8)>(p);
  const __m256i bytes = _mm256_broadcastsi128_si256(
      _mm_set_epi64x(static_cast<int64_t>(hi), static_cast<int64_t>(lo)));
  const Packed16Tables<kBits>& t = kPacked16<kBits>;
  const __m256i pairs = _mm256_shuffle_epi8(bytes, Load256(t.shuffle));
  const __m256i at8 = _mm256_srli_epi16(_mm256_mullo_epi16(pairs, Load256(t.multiplier)), 8);
  return _mm256_and_si256(at8, _mm256_set1_epi16((1 << kBits) - 1));
}

inline __m256i UnpackPacked16(const uint8_t* p, int bits) {
  switch (bits) {
    case 2:
      return UnpackPacked16<2>(p);
    case 3:
      return UnpackPacked16<3>(p);
    case 4:
      return UnpackPacked16<4>(p);
    case 5:
      return UnpackPacked16<5>(p);
    case 6:
      return UnpackPacked16<6>(p);
    case 7:
      return UnpackPacked16<7>(p);
    default:
      return UnpackPacked16<8>(p);
  }
}

// 16 uint16 lanes as floats, columns 0-7 and 8-15.
inline void Uint16ToFloats(__m256i v, __m256* out) {
  out[0] = _mm256_cvtepi32_ps(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(v)));
  out[1] = _mm256_cvtepi32_ps(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(v, 1)));
}

// Reads the parameters of a TILE16 uniform-grid weight (symmetric or not, hierarchical or
// not) with the values of DecodeGroupParams; the strides are derived once.
template <int kBits>
class Tile16Params {
 public:
  Tile16Params(const WeightView& w, float zero_shift)
      : w_(w),
        groups_(w.fmt.n_groups()),
        scale_rows_(w.fmt.scale_bits ? w.fmt.n_super() : groups_),
        zero_shift_(zero_shift) {}

  __attribute__((always_inline)) GroupParams Load(int64_t tile, int64_t group) const {
    const int scale_bits = w_.fmt.scale_bits;
    const int64_t tile_group = tile * groups_ + group;
    GroupParams p;
    const int64_t index =
        (tile * scale_rows_ + (scale_bits ? group / w_.fmt.super_group : group)) * kTileN;
#pragma GCC unroll 8
    for (int h = 0; h < 2; ++h) p.scale[h] = LoadScales8(index + 8 * h);
    if (scale_bits) {
      __m256 sub[2];
      Uint16ToFloats(UnpackPacked16(w_.sub_scales + tile_group * 2 * scale_bits, scale_bits), sub);
      const __m256 one = _mm256_set1_ps(1.0f);
#pragma GCC unroll 8
      for (int h = 0; h < 2; ++h)
        p.scale[h] = _mm256_mul_ps(p.scale[h], _mm256_add_ps(sub[h], one));
    }
    if (w_.zero_points) {
      Uint16ToFloats(UnpackPacked16<kBits>(w_.zero_points + tile_group * 2 * kBits), p.zero);
    } else {
      p.zero[0] = p.zero[1] = _mm256_set1_ps(static_cast<float>(1 << (kBits - 1)));
    }
    const __m256 shift = _mm256_set1_ps(zero_shift_);
#pragma GCC unroll 8
    for (int h = 0; h < 2; ++h) p.zero[h] = _mm256_sub_ps(p.zero[h], shift);
    return p;
  }

 private:
  __m256 LoadScales8(int64_t index) const {
    if (w_.scales_f16) {
      const uint16_t* s = static_cast<const uint16_t*>(w_.scales) + index;
      return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s)));
    }
    return _mm256_loadu_ps(static_cast<const float*>(w_.scales) + index);
  }

  const WeightView& w_;
  int64_t groups_, scale_rows_;
  float zero_shift_;
};

GroupParams LoadParams(const float* scale, const float* zero, float zero_shift) {
  GroupParams p;
  const __m256 shift = _mm256_set1_ps(zero_shift);
#pragma GCC unroll 8
  for (int h = 0; h < 2; ++h) {
    p.scale[h] = _mm256_loadu_ps(scale + 8 * h);
    p.zero[h] = _mm256_sub_ps(_mm256_loadu_ps(zero + 8 * h), shift);
  }
  return p;
}

// ------------------------------------------------------------------------------------------
// Native TILE16 unpacking.

// Bit i of the 32-bit mask at p as byte i: value if set, else 0.
inline __m256i MaskBitAs(const uint8_t* p, char value) {
  const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,  //
                                          2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
  const __m256i bit = _mm256_set1_epi64x(static_cast<int64_t>(0x8040201008040201ull));
  const __m256i x = _mm256_and_si256(_mm256_shuffle_epi8(Broadcast4(p), spread), bit);
  return _mm256_and_si256(_mm256_cmpeq_epi8(x, bit), _mm256_set1_epi8(value));
}

// Codes of k4-step s (0-3) of the super-block at sb, columns 8h .. 8h + 7, as u8: lane
// 4c + r holds column 8h + c at k = 4s + r.
template <int kBits>
inline __m256i UnpackStep(const uint8_t* sb, int s, int h) {
  if constexpr (kBits == 8) {
    return Load256(sb + 64 * s + 32 * h);
  } else if constexpr (kBits >= 4) {
    const __m256i p = Load256(sb + 64 * (s >> 1) + 32 * h);
    const __m256i low =
        _mm256_and_si256(s & 1 ? _mm256_srli_epi16(p, 4) : p, _mm256_set1_epi8(0x0f));
    if constexpr (kBits == 4) return low;
    if constexpr (kBits == 5) return _mm256_or_si256(low, MaskBitAs(sb + 128 + 8 * s + 4 * h, 16));
    // 6-bit: step s's pair of the plane moved to bits 4-5 by one 16-bit shift (the bits a shift
    // carries across a byte boundary never land on bits 4-5), then & 0x30
    const __m256i plane = Load256(sb + 128 + 32 * h);
    const __m256i moved = s == 3 ? _mm256_srli_epi16(plane, 2)
                          : s == 2 ? plane
                                   : _mm256_slli_epi16(plane, 4 - 2 * s);
    return _mm256_or_si256(low, _mm256_and_si256(moved, _mm256_set1_epi8(0x30)));
  } else {
    const __m256i p = Load256(sb + 32 * h);
    const __m256i low = _mm256_and_si256(s ? _mm256_srli_epi16(p, 2 * s) : p, _mm256_set1_epi8(3));
    if constexpr (kBits == 2) return low;
    return _mm256_or_si256(low, MaskBitAs(sb + 64 + 8 * s + 4 * h, 4));
  }
}

// ------------------------------------------------------------------------------------------
// Int8 path.
//
// Codes of at most 6 bits are multiplied directly (u8 x s8); 8-bit codes and codebook values
// use the sign trick (see the top of the file). Steps whose int16 pair sums may be added before
// widening, each pair being at most 2 * (2^bits - 1) * 128:
constexpr int Int16Steps(int bits) {
  return bits <= 2 ? kMaxSteps : bits == 3 ? 16 : bits == 4 ? 8 : bits == 5 ? 4 : 2;
}
// 5- and 6-bit codes are summed in int16 over runs of this many steps, shorter than a
// super-block: Int16Steps(6), and for 5-bit codes as fast as their 4 (fewer live registers).
constexpr int kShortRun = Int16Steps(6);

inline __m256i Widen(__m256i pairs16) {  // int16 pairs to int32 sums (vpmaddwd with ones)
  return _mm256_madd_epi16(pairs16, _mm256_set1_epi16(1));
}

inline __m256i Flip(__m256i v) { return _mm256_xor_si256(v, _mm256_set1_epi8(-128)); }

// Partial dot of u8 codes v and s8 activations x (four k per 32-bit lane): AVX2 keeps int16 pair
// sums (vpmaddubsw, widened by PartialToInt32 every Int16Steps); AVX-VNNI adds straight into
// int32 (vpdpbusd), and PartialToInt32 is then nothing.
#if defined(QX_AVX_VNNI)
inline __m256i Dpbusd(__m256i acc, __m256i v, __m256i x) {
#if defined(QX_AVXVNNI_EVEX)
  return _mm256_dpbusd_epi32(acc, v, x);
#else
  return _mm256_dpbusd_avx_epi32(acc, v, x);
#endif
}
#endif

inline __m256i AddPartial(__m256i acc, __m256i v, __m256i x) {
#if defined(QX_AVX_VNNI)
  return Dpbusd(acc, v, x);
#else
  return _mm256_add_epi16(_mm256_maddubs_epi16(v, x), acc);
#endif
}

inline __m256i PartialToInt32(__m256i partial) {
#if defined(QX_AVX_VNNI)
  return partial;
#else
  return Widen(partial);
#endif
}

// dot + u8 codes v[i] . s8 activations x[i] over a run of kRun steps (kRun <= Int16Steps): AVX2
// sums the run in int16 and widens it at once; AVX-VNNI adds each step straight into dot.
template <int kRun>
inline __m256i AddRun(__m256i dot, const __m256i* v, const __m256i* x) {
#if defined(QX_AVX_VNNI)
#pragma GCC unroll 4
  for (int i = 0; i < kRun; ++i) dot = Dpbusd(dot, v[i], x[i]);
  return dot;
#else
  __m256i sum16 = _mm256_maddubs_epi16(v[0], x[0]);
#pragma GCC unroll 4
  for (int i = 1; i < kRun; ++i) sum16 = AddPartial(sum16, v[i], x[i]);
  return _mm256_add_epi32(dot, Widen(sum16));
#endif
}

// Sign trick: with w' = v - 128 as s8, |w'| * sign(a, w') = w' * a (|w'| <= 128, |a| <= 127);
// acc (int32) += w' . a.
inline __m256i AddSignedDot(__m256i acc, __m256i w_abs, __m256i w_signed, __m256i a) {
#if defined(QX_AVX_VNNI)
  return Dpbusd(acc, w_abs, _mm256_sign_epi8(a, w_signed));
#else
  return _mm256_add_epi32(Widen(_mm256_maddubs_epi16(w_abs, _mm256_sign_epi8(a, w_signed))), acc);
#endif
}

// acc += scale * sa * (dot - zero * isum): the block's contribution to one row.
inline void FinishInt8(const __m256i* dot, const GroupParams& p, float sa, int32_t isum,
                       __m256* acc) {
  const __m256 sum = _mm256_set1_ps(static_cast<float>(isum));
  const __m256 vsa = _mm256_set1_ps(sa);
#pragma GCC unroll 8
  for (int h = 0; h < 2; ++h) {
    const __m256 d = _mm256_fnmadd_ps(p.zero[h], sum, _mm256_cvtepi32_ps(dot[h]));
    acc[h] = _mm256_fmadd_ps(_mm256_mul_ps(p.scale[h], vsa), d, acc[h]);
  }
}

// Stores acc (+ bias) as row m of the tile's output columns.
inline void StoreRow(const MatMulArgs& args, int64_t m, int64_t tile, const __m256* acc) {
  const int64_t n0 = tile * kTileN;
  if (n0 + kTileN <= args.w->fmt.N) {
    float* y = args.y + m * args.ldy + n0;
#pragma GCC unroll 8
    for (int h = 0; h < 2; ++h) {
      const __m256 b = args.bias ? _mm256_loadu_ps(args.bias + n0 + 8 * h) : _mm256_setzero_ps();
      _mm256_storeu_ps(y + 8 * h, _mm256_add_ps(acc[h], b));
    }
    return;
  }
  alignas(32) float tmp[kTileN];
  _mm256_store_ps(tmp, acc[0]);
  _mm256_store_ps(tmp + 8, acc[1]);
  StoreTileRow(args, m, tile, tmp);
}

// Decode: dot[r] += super-blocks [j0, j1) of the block times row r (codes <= 15, j1 - j0
// within Int16Steps).
template <int kBits, int kRows>
inline void DotSuperBlocksUnsigned(const uint8_t* sb, int j0, int j1, const int8_t* const* a,
                                   __m256i (*dot)[2]) {
  __m256i sum16[kRows][2];
#pragma GCC unroll 4
  for (int r = 0; r < kRows; ++r) sum16[r][0] = sum16[r][1] = _mm256_setzero_si256();
  for (int j = j0; j < j1; ++j) {
    const uint8_t* p = sb + j * 32 * kBits;
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {
#pragma GCC unroll 4
      for (int s = 0; s < 4; ++s) {
        const __m256i v = UnpackStep<kBits>(p, s, h);
#pragma GCC unroll 4
        for (int r = 0; r < kRows; ++r) {
          const __m256i x = Broadcast4(a[r] + 16 * j + 4 * s);
          sum16[r][h] = AddPartial(sum16[r][h], v, x);
        }
      }
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < kRows; ++r) {
    Pin(sum16[r][0]);
    Pin(sum16[r][1]);
  }
#pragma GCC unroll 4
  for (int r = 0; r < kRows; ++r)
#pragma GCC unroll 8
    for (int h = 0; h < 2; ++h)
      dot[r][h] = _mm256_add_epi32(dot[r][h], PartialToInt32(sum16[r][h]));
}

// Decode, 5- and 6-bit codes: dot[r] += the block's n_sb super-blocks times row r. Each run of
// kShortRun steps is unpacked once for all rows, then summed per row (AddRun), so that only the
// int32 dots live across runs.
template <int kBits, int kRows>
inline void DotSuperBlocksShort(const uint8_t* sb, int n_sb, const int8_t* const* a,
                                __m256i (*dot)[2]) {
  constexpr int kRun = kShortRun;
  for (int j = 0; j < n_sb; ++j) {
    const uint8_t* p = sb + j * 32 * kBits;
#pragma GCC unroll 4
    for (int s0 = 0; s0 < 4; s0 += kRun) {
      __m256i v[2][kRun];
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h)
#pragma GCC unroll 4
        for (int i = 0; i < kRun; ++i) v[h][i] = UnpackStep<kBits>(p, s0 + i, h);
#pragma GCC unroll 4
      for (int r = 0; r < kRows; ++r) {
        __m256i x[kRun];
#pragma GCC unroll 4
        for (int i = 0; i < kRun; ++i) x[i] = Broadcast4(a[r] + 16 * j + 4 * (s0 + i));
#pragma GCC unroll 2
        for (int h = 0; h < 2; ++h) dot[r][h] = AddRun<kRun>(dot[r][h], v[h], x);
      }
    }
  }
}

// Decode, 8-bit codes: dot[r] += super-block j of the block times row r, as w' (sign trick).
template <int kRows>
inline void DotSuperBlockSigned(const uint8_t* sb, int j, const int8_t* const* a,
                                __m256i (*dot)[2]) {
  const uint8_t* p = sb + j * 256;
#pragma GCC unroll 4
  for (int s = 0; s < 4; ++s) {
    const __m256i w0 = Flip(UnpackStep<8>(p, s, 0)), w1 = Flip(UnpackStep<8>(p, s, 1));
    const __m256i abs0 = _mm256_abs_epi8(w0), abs1 = _mm256_abs_epi8(w1);
#pragma GCC unroll 4
    for (int r = 0; r < kRows; ++r) {
      const __m256i x = Broadcast4(a[r] + 16 * j + 4 * s);
      dot[r][0] = AddSignedDot(dot[r][0], abs0, w0, x);
      dot[r][1] = AddSignedDot(dot[r][1], abs1, w1, x);
    }
  }
}

// Decode, int8 path: native TILE16, rows [m0, m0 + kRows), unpacked in registers.
template <int kBits, int kRows>
void DecodeInt8(const MatMulArgs& args, int64_t tile_begin, int64_t tile_end, int64_t m0) {
  // super-blocks per int16 sum of DotSuperBlocksUnsigned (codes <= 15)
  constexpr int kChunk = kBits <= 4 ? Int16Steps(kBits) / 4 : 1;
  const WeightView& w = *args.w;
  const Tile16Params<kBits> reader(w, kBits == 8 ? 128.0f : 0.0f);
  const int64_t sb_bytes = 32 * kBits;
  const int64_t tile_bytes = w.fmt.k_stored() / kKAlign * sb_bytes;
  for (int64_t t = tile_begin; t < tile_end; ++t) {
    __m256 acc[kRows][2];
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    GroupParams params;
    int64_t group = -1;
    for (int64_t bi = 0; bi < args.n_blocks; ++bi) {
      const KBlock& b = args.blocks[bi];
      if (b.group != group) {
        group = b.group;
        params = reader.Load(t, group);
      }
      __m256i dot[kRows][2];
      const int8_t* a[kRows];
#pragma GCC unroll 8
      for (int r = 0; r < kRows; ++r) {
        dot[r][0] = dot[r][1] = _mm256_setzero_si256();
        a[r] = args.a_i8 + (m0 + r) * args.lda + b.offset;
      }
      const uint8_t* sb = w.B + t * tile_bytes + b.offset / kKAlign * sb_bytes;
      const int n_sb = static_cast<int>(b.length / kKAlign);
      if constexpr (kBits == 5 || kBits == 6) {
        DotSuperBlocksShort<kBits, kRows>(sb, n_sb, a, dot);
      } else {
        for (int j = 0; j < n_sb; j += kChunk) {
          if constexpr (kBits == 8)
            DotSuperBlockSigned<kRows>(sb, j, a, dot);
          else
            DotSuperBlocksUnsigned<kBits, kRows>(sb, j, j + kChunk < n_sb ? j + kChunk : n_sb, a,
                                                 dot);
        }
      }
#pragma GCC unroll 8
      for (int r = 0; r < kRows; ++r) {
        const int64_t i = (m0 + r) * args.n_blocks + bi;
        FinishInt8(dot[r], params, args.a_scale[i], args.a_sum[i], acc[r]);
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) StoreRow(args, m0 + r, t, acc[r]);
  }
}

// ------------------------------------------------------------------------------------------
// Float path, decode. Activations are pre-scaled once per call so that code bytes convert in
// place (see the top of the file): ap[k] = a[k] * 2^-8(k % 4) for k % 4 < 3, and a[k] for
// k % 4 == 3, whose byte is shifted down instead (in place it would reach the sign bit). The
// zero point is subtracted from the converted code, scaled alike, so that every term is
// a * (code - zero) as in the reference: no cancellation against a separate zero * sum(a).
float* DecodeFloatBuffer(size_t n) {
  static thread_local Scratch scratch;
  return static_cast<float*>(scratch.Get(n * sizeof(float)));
}

// ap[r][k] on the stored k axis for rows [m0, m0 + rows).
void PrescaleActivations(const MatMulArgs& args, int64_t m0, int64_t rows, float* ap) {
  const int64_t ks = args.w->fmt.k_stored();
  const __m256 pattern =
      _mm256_setr_ps(1.0f, 0x1p-8f, 0x1p-16f, 1.0f, 1.0f, 0x1p-8f, 0x1p-16f, 1.0f);
  for (int64_t r = 0; r < rows; ++r) {
    const float* a = args.a_f32 + (m0 + r) * args.lda;
    for (int64_t bi = 0; bi < args.n_blocks; ++bi) {
      const KBlock& b = args.blocks[bi];
      for (int64_t k = b.offset; k < b.offset + b.length; k += 8)
        _mm256_storeu_ps(ap + r * ks + k, _mm256_mul_ps(_mm256_loadu_ps(a + k), pattern));
    }
  }
}

// Zero points scaled like the converted bytes: zero, zero * 2^8, zero * 2^16 (per half).
struct ScaledZeros {
  __m256 z[2][3];
};

inline ScaledZeros ScaleZeros(const GroupParams& p) {
  ScaledZeros s;
#pragma GCC unroll 8
  for (int h = 0; h < 2; ++h) {
    s.z[h][0] = p.zero[h];
    s.z[h][1] = _mm256_mul_ps(p.zero[h], _mm256_set1_ps(0x1p8f));
    s.z[h][2] = _mm256_mul_ps(p.zero[h], _mm256_set1_ps(0x1p16f));
  }
  return s;
}

// Accumulators per (row, half) over which the 4 k of a step are spread: enough independent
// FMA chains to cover the FMA latency.
constexpr int FloatSplit(int rows) { return rows == 1 ? 2 : 1; }

// dot[r][h] += (codes v - zero) (one step, 8 columns) times the step's pre-scaled activations.
template <int kRows>
inline void FmaStep(__m256i v, const __m256* z, const float* const* ap, int k, int h,
                    __m256 (*dot)[2][FloatSplit(kRows)]) {
  constexpr int kSplit = FloatSplit(kRows);
  const __m256 f[4] = {
      _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(0xff))), z[0]),
      _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(0xff00))), z[1]),
      _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(0xff0000))), z[2]),
      _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v, 24)), z[0])};
#pragma GCC unroll 4
  for (int r = 0; r < kRows; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j)
      dot[r][h][j % kSplit] =
          _mm256_fmadd_ps(_mm256_broadcast_ss(ap[r] + k + j), f[j], dot[r][h][j % kSplit]);
}

template <int kBits, int kRows>
void DecodeFloat(const MatMulArgs& args, int64_t tile_begin, int64_t tile_end, int64_t m0,
                 const float* ap) {
  constexpr int kSplit = FloatSplit(kRows);
  const WeightView& w = *args.w;
  const Tile16Params<kBits> reader(w, 0.0f);
  const int64_t ks = w.fmt.k_stored();
  const int64_t sb_bytes = 32 * kBits;
  const int64_t tile_bytes = ks / kKAlign * sb_bytes;
  for (int64_t t = tile_begin; t < tile_end; ++t) {
    __m256 acc[kRows][2];
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    GroupParams params;
    ScaledZeros zeros;
    int64_t group = -1;
    for (int64_t bi = 0; bi < args.n_blocks; ++bi) {
      const KBlock& b = args.blocks[bi];
      if (b.group != group) {
        group = b.group;
        params = reader.Load(t, group);
        zeros = ScaleZeros(params);
      }
      __m256 dot[kRows][2][kSplit];
      const float* a[kRows];
#pragma GCC unroll 8
      for (int r = 0; r < kRows; ++r) {
#pragma GCC unroll 8
        for (int h = 0; h < 2; ++h)
#pragma GCC unroll 8
          for (int j = 0; j < kSplit; ++j) dot[r][h][j] = _mm256_setzero_ps();
        a[r] = ap + r * ks + b.offset;
      }
      const uint8_t* sb = w.B + t * tile_bytes + b.offset / kKAlign * sb_bytes;
      for (int k = 0; k < b.length; k += kKAlign, sb += sb_bytes) {
#pragma GCC unroll 4
        for (int s = 0; s < 4; ++s)
#pragma GCC unroll 8
          for (int h = 0; h < 2; ++h)
            FmaStep<kRows>(UnpackStep<kBits>(sb, s, h), zeros.z[h], a, k + 4 * s, h, dot);
      }
#pragma GCC unroll 8
      for (int r = 0; r < kRows; ++r) {
#pragma GCC unroll 8
        for (int h = 0; h < 2; ++h) {
          __m256 d = dot[r][h][0];
#pragma GCC unroll 8
          for (int j = 1; j < kSplit; ++j) d = _mm256_add_ps(d, dot[r][h][j]);
          acc[r][h] = _mm256_fmadd_ps(params.scale[h], d, acc[r][h]);
        }
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) StoreRow(args, m0 + r, t, acc[r]);
  }
}

// ------------------------------------------------------------------------------------------
// Prefill, int8 path: the tile is unpacked once per chunk of k-blocks (at most kChunkSteps
// k4-steps) into an L1 buffer; each group of rows then runs over the whole chunk, so that the
// per-block bookkeeping of a row group stays in one function and overlaps with its dot products.

constexpr int kChunkSteps = 128;  // 512 k: 8 KiB of codes (16 KiB in signed mode)

// One k-block of an unpacked chunk: its codes and parameters.
struct Int8Block {
  const uint8_t* codes;
  int steps;
  int64_t index;   // in args.blocks
  int64_t offset;  // on the stored k axis
  GroupParams params;
};

// Codes of a chunk: per k4-step either 64 bytes of u8 codes <= 63 (columns 0-7, then 8-15) or,
// in signed mode, 128 bytes: |w'| of both halves, then w'.
struct Int8Chunk {
  alignas(64) uint8_t data[kChunkSteps * 128];
  Int8Block blocks[kChunkSteps / 4];
  int n_blocks = 0;
  bool is_signed = false;
};

template <int kRows>
inline void LoadAcc(const float* y, __m256 (*acc)[2]) {
#pragma GCC unroll 8
  for (int r = 0; r < kRows; ++r)
#pragma GCC unroll 8
    for (int h = 0; h < 2; ++h) acc[r][h] = _mm256_load_ps(y + r * kTileN + 8 * h);
}

template <int kRows>
inline void StoreAcc(const __m256 (*acc)[2], float* y) {
#pragma GCC unroll 8
  for (int r = 0; r < kRows; ++r)
#pragma GCC unroll 8
    for (int h = 0; h < 2; ++h) _mm256_store_ps(y + r * kTileN + 8 * h, acc[r][h]);
}

// dot[r] = part + (first ? -zero * isum[r] : dot[r]). Every term is an integer below 2^24 in
// magnitude, so the float sums are exact and dot ends as the reference's dot - zero * isum.
template <int kRows>
inline void AddPartialDot(const Int8Block& blk, const int32_t* isum, int64_t isum_stride,
                          bool first, __m256i (*part)[2], __m256 (*dot)[2]) {
#pragma GCC unroll 8
  for (int r = 0; r < kRows; ++r) {
    const __m256 sum = _mm256_set1_ps(static_cast<float>(isum[r * isum_stride + blk.index]));
#pragma GCC unroll 8
    for (int h = 0; h < 2; ++h) {
      const __m256 d = _mm256_cvtepi32_ps(part[r][h]);
      dot[r][h] =
          first ? _mm256_fnmadd_ps(blk.params.zero[h], sum, d) : _mm256_add_ps(dot[r][h], d);
    }
  }
}

// acc[r] += scale * sa[r] * dot[r]: the block's contribution.
template <int kRows>
inline void AddBlock(const Int8Block& blk, const float* sa, int64_t sa_stride,
                     const __m256 (*dot)[2], __m256 (*acc)[2]) {
#pragma GCC unroll 8
  for (int r = 0; r < kRows; ++r) {
    const __m256 s = _mm256_broadcast_ss(sa + r * sa_stride + blk.index);
#pragma GCC unroll 8
    for (int h = 0; h < 2; ++h)
      acc[r][h] = _mm256_fmadd_ps(_mm256_mul_ps(blk.params.scale[h], s), dot[r][h], acc[r][h]);
  }
}

// sum16[r] = codes x row r over steps [s0, s1) of blk, as int16 pairs (s1 - s0 <= kFlush).
template <int kRows>
inline void SumSteps(const Int8Block& blk, int s0, int s1, const int8_t* a, int64_t lda,
                     __m256i (*sum16)[2]) {
#pragma GCC unroll 8
  for (int r = 0; r < kRows; ++r) sum16[r][0] = sum16[r][1] = _mm256_setzero_si256();
  for (int s = s0; s < s1; ++s) {
    const __m256i w0 = Load256(blk.codes + 64 * s), w1 = Load256(blk.codes + 64 * s + 32);
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) {
      const __m256i x = Broadcast4(a + r * lda + 4 * s);
      sum16[r][0] = AddPartial(sum16[r][0], w0, x);
      sum16[r][1] = AddPartial(sum16[r][1], w1, x);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < kRows; ++r) {
    Pin(sum16[r][0]);
    Pin(sum16[r][1]);
    sum16[r][0] = PartialToInt32(sum16[r][0]);
    sum16[r][1] = PartialToInt32(sum16[r][1]);
  }
}

// dot[r] = codes x row r over all steps of blk, in runs of kRun steps (5- and 6-bit codes,
// whose int16 runs are shorter than a super-block): each run is summed per row (AddRun), so
// that only the int32 dots live across runs. Block lengths are multiples of 16 k, hence of
// kRun steps.
template <int kRows, int kRun>
inline void SumShortRuns(const Int8Block& blk, const int8_t* a, int64_t lda, __m256i (*dot)[2]) {
#pragma GCC unroll 8
  for (int r = 0; r < kRows; ++r) dot[r][0] = dot[r][1] = _mm256_setzero_si256();
  for (int s0 = 0; s0 < blk.steps; s0 += kRun) {
    const uint8_t* codes = blk.codes + 64 * s0;
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) {
      __m256i x[kRun];
#pragma GCC unroll 4
      for (int i = 0; i < kRun; ++i) x[i] = Broadcast4(a + r * lda + 4 * (s0 + i));
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {
        __m256i w[kRun];
#pragma GCC unroll 4
        for (int i = 0; i < kRun; ++i) w[i] = Load256(codes + 64 * i + 32 * h);
        dot[r][h] = AddRun<kRun>(dot[r][h], w, x);
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < kRows; ++r) {
    Pin(dot[r][0]);
    Pin(dot[r][1]);
  }
}

// Unsigned chunk microkernel: y[r] += the chunk's contribution to row r. a: row 0 at the start
// of the stored k axis, rows lda apart; sa, isum: row 0's per-block activation scales and sums.
// The int16 sums are widened every kFlush steps; y stays in memory (L1), the registers hold
// the int16 sums.
template <int kRows, int kFlush>
void ChunkRowsUnsigned(const Int8Chunk& chunk, const int8_t* a, int64_t lda, const float* sa,
                       const int32_t* isum, int64_t nb, float* y) {
  for (int i = 0; i < chunk.n_blocks; ++i) {
    const Int8Block& blk = chunk.blocks[i];
    const int8_t* ab = a + blk.offset;
    __m256i part[kRows][2];
    __m256 dot[kRows][2];
    if constexpr (kFlush < 4) {  // 5- and 6-bit codes: int32 sums over the whole block
      SumShortRuns<kRows, kFlush>(blk, ab, lda, part);
      AddPartialDot<kRows>(blk, isum, nb, true, part, dot);
    } else if (blk.steps <= kFlush) {  // the usual case: one int16 run per block
      SumSteps<kRows>(blk, 0, blk.steps, ab, lda, part);
      AddPartialDot<kRows>(blk, isum, nb, true, part, dot);
    } else {
      for (int s0 = 0; s0 < blk.steps; s0 += kFlush) {
        SumSteps<kRows>(blk, s0, s0 + kFlush < blk.steps ? s0 + kFlush : blk.steps, ab, lda, part);
        AddPartialDot<kRows>(blk, isum, nb, s0 == 0, part, dot);
      }
    }
    __m256 acc[kRows][2];
    LoadAcc<kRows>(y, acc);
    AddBlock<kRows>(blk, sa, nb, dot, acc);
    StoreAcc<kRows>(acc, y);
  }
}

// Signed chunk microkernel (sign trick), as ChunkRowsUnsigned.
template <int kRows>
void ChunkRowsSigned(const Int8Chunk& chunk, const int8_t* a, int64_t lda, const float* sa,
                     const int32_t* isum, int64_t nb, float* y) {
  __m256 acc[kRows][2];
  LoadAcc<kRows>(y, acc);
  for (int i = 0; i < chunk.n_blocks; ++i) {
    const Int8Block& blk = chunk.blocks[i];
    const int8_t* ab = a + blk.offset;
    __m256i part[kRows][2];
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) part[r][0] = part[r][1] = _mm256_setzero_si256();
    for (int s = 0; s < blk.steps; ++s) {
      const uint8_t* ws = blk.codes + 128 * s;
      const __m256i abs0 = Load256(ws), abs1 = Load256(ws + 32);
      const __m256i sgn0 = Load256(ws + 64), sgn1 = Load256(ws + 96);
#pragma GCC unroll 8
      for (int r = 0; r < kRows; ++r) {
        const __m256i x = Broadcast4(ab + r * lda + 4 * s);
        part[r][0] = AddSignedDot(part[r][0], abs0, sgn0, x);
        part[r][1] = AddSignedDot(part[r][1], abs1, sgn1, x);
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) {
      Pin(part[r][0]);
      Pin(part[r][1]);
    }
    __m256 dot[kRows][2];
    AddPartialDot<kRows>(blk, isum, nb, true, part, dot);
    AddBlock<kRows>(blk, sa, nb, dot, acc);
  }
  StoreAcc<kRows>(acc, y);
}

constexpr int kUnsignedRowBlock = 4;  // 8 int16 accumulators
// 5- and 6-bit codes (SumShortRuns): 3 rows are faster on AVX2 (6 int32 accumulators leave room
// for the run's codes and activations); AVX-VNNI's vpdpbusd chains want the 8 of 4 rows.
#if defined(QX_AVX_VNNI)
constexpr int kShortRowBlock = 4;
#else
constexpr int kShortRowBlock = 3;
#endif
constexpr int kSignedRowBlock = 2;    // 4 int32 + 4 float accumulators + 4 code vectors

// All rows of the call over one chunk; a: row 0 at the start of the stored k axis.
// The activations of one call's rows: row 0 at the start of the stored k axis.
struct Int8Rows {
  const int8_t* a;
  int64_t lda;
  const float* sa;     // [row][block]
  const int32_t* sum;  // [row][block]
  int64_t nb;
};

template <int kFlush>
void ChunkUnsigned(const Int8Chunk& chunk, const Int8Rows& in, int64_t rows, float* y) {
  int64_t r = 0;
  auto run = [&](auto kernel) {
    kernel(chunk, in.a + r * in.lda, in.lda, in.sa + r * in.nb, in.sum + r * in.nb, in.nb,
           y + r * kTileN);
  };
  constexpr int kBlock = kFlush < 4 ? kShortRowBlock : kUnsignedRowBlock;
  for (; r + kBlock <= rows; r += kBlock)
    run(ChunkRowsUnsigned<kBlock, kFlush>);
  switch (rows - r) {
    case 3:
      return run(ChunkRowsUnsigned<3, kFlush>);
    case 2:
      return run(ChunkRowsUnsigned<2, kFlush>);
    case 1:
      return run(ChunkRowsUnsigned<1, kFlush>);
    default:
      return;
  }
}

void ChunkSigned(const Int8Chunk& chunk, const Int8Rows& in, int64_t rows, float* y) {
  int64_t r = 0;
  auto run = [&](auto kernel) {
    kernel(chunk, in.a + r * in.lda, in.lda, in.sa + r * in.nb, in.sum + r * in.nb, in.nb,
           y + r * kTileN);
  };
  for (; r + kSignedRowBlock <= rows; r += kSignedRowBlock) run(ChunkRowsSigned<kSignedRowBlock>);
  if (rows - r == 1) run(ChunkRowsSigned<1>);
}

// Writes one step of u8 values in signed mode (|w'|, then w').
inline void StoreSignedStep(__m256i v0, __m256i v1, uint8_t* out) {
  const __m256i w0 = Flip(v0), w1 = Flip(v1);
  Store256(out, _mm256_abs_epi8(w0));
  Store256(out + 32, _mm256_abs_epi8(w1));
  Store256(out + 64, w0);
  Store256(out + 96, w1);
}

// Unpacks the codes of tile t on block b into out (64 or 128 bytes per step); returns the
// block's parameters. kBits = 0: any format, through UnpackTileU8.
template <int kBits>
GroupParams UnpackInt8Block(const WeightView& w, const Tile16Params<kBits ? kBits : 8>& reader,
                            int64_t t, const KBlock& b, bool is_signed, uint8_t* out) {
  const int steps = static_cast<int>(b.length / 4);
  if constexpr (kBits == 0) {
    alignas(32) float scale[kTileN], zero[kTileN];
    UnpackTileU8(w, t, b, out, scale, zero);
    for (int s = steps - 1; s >= 0 && is_signed; --s)  // in place, backwards
      StoreSignedStep(Load256(out + 64 * s), Load256(out + 64 * s + 32), out + 128 * s);
    return LoadParams(scale, zero, is_signed ? 128.0f : 0.0f);
  } else {
    const int64_t sb_bytes = 32 * kBits;
    const uint8_t* sb = w.B + (t * w.fmt.k_stored() + b.offset) / kKAlign * sb_bytes;
    for (int j = 0; j < steps / 4; ++j, sb += sb_bytes) {
#pragma GCC unroll 4
      for (int s = 0; s < 4; ++s) {
        const __m256i v0 = UnpackStep<kBits>(sb, s, 0), v1 = UnpackStep<kBits>(sb, s, 1);
        if constexpr (kBits == 8) {
          StoreSignedStep(v0, v1, out + 128 * (4 * j + s));
        } else {
          Store256(out + 64 * (4 * j + s), v0);
          Store256(out + 64 * (4 * j + s) + 32, v1);
        }
      }
    }
    return reader.Load(t, b.group);
  }
}

// Unpacks blocks [b0, b1) of tile t (at most kChunkSteps steps) into chunk.
template <int kBits>
void FillInt8Chunk(const MatMulArgs& args, const Tile16Params<kBits ? kBits : 8>& reader, int64_t t,
                   int64_t b0, int64_t b1, Int8Chunk* chunk) {
  const WeightView& w = *args.w;
  chunk->is_signed = kBits ? kBits == 8 : w.codebook != nullptr || w.fmt.bits > 4;
  uint8_t* out = chunk->data;
  chunk->n_blocks = 0;
  for (int64_t bi = b0; bi < b1; ++bi) {
    const KBlock& b = args.blocks[bi];
    const GroupParams p = UnpackInt8Block<kBits>(w, reader, t, b, chunk->is_signed, out);
    Int8Block& blk = chunk->blocks[chunk->n_blocks++];
    blk.codes = out;
    blk.steps = static_cast<int>(b.length / 4);
    blk.index = bi;
    blk.offset = b.offset;
    blk.params = p;
    out += blk.steps * (chunk->is_signed ? 128 : 64);
  }
}

template <int kBits>
void PrefillInt8(const MatMulArgs& args, int64_t tile_begin, int64_t tile_end, int64_t m0,
                 int64_t rows) {
  Int8Chunk chunk;
  alignas(64) float y[kPrefillRows * kTileN];
  const Tile16Params<kBits ? kBits : 8> reader(*args.w, kBits == 8 ? 128.0f : 0.0f);
  const int64_t nb = args.n_blocks;
  const Int8Rows in = {args.a_i8 + m0 * args.lda, args.lda, args.a_scale + m0 * nb,
                       args.a_sum + m0 * nb, nb};
  const int bits = args.w->fmt.bits;
  for (int64_t t = tile_begin; t < tile_end; ++t) {
    std::memset(y, 0, static_cast<size_t>(rows) * kTileN * sizeof(float));
    for (int64_t b0 = 0, b1 = 0; b0 < nb; b0 = b1) {
      for (int64_t steps = 0; b1 < nb && steps + args.blocks[b1].length / 4 <= kChunkSteps; ++b1)
        steps += args.blocks[b1].length / 4;
      FillInt8Chunk<kBits>(args, reader, t, b0, b1, &chunk);
      if (chunk.is_signed)
        ChunkSigned(chunk, in, rows, y);
      else if (bits <= 2)
        ChunkUnsigned<Int16Steps(2)>(chunk, in, rows, y);
      else if (bits == 3)
        ChunkUnsigned<Int16Steps(3)>(chunk, in, rows, y);
      else if (bits == 4)
        ChunkUnsigned<Int16Steps(4)>(chunk, in, rows, y);
      else  // 5- and 6-bit
        ChunkUnsigned<kShortRun>(chunk, in, rows, y);
    }
    for (int64_t r = 0; r < rows; ++r) {
      const __m256 acc[2] = {_mm256_load_ps(y + r * kTileN), _mm256_load_ps(y + r * kTileN + 8)};
      StoreRow(args, m0 + r, t, acc);
    }
  }
}

// Float prefill: the tile is dequantized (scale * (code - zero), as DequantTileF32) into
// wf[k][16], and rows are register-blocked by kFloatRowBlock.
constexpr int kFloatRowBlock = 6;

template <int kRows>
inline void FmaRows(const float* wf, int64_t len, const float* a, int64_t lda, float* y) {
  __m256 acc[kRows][2];
#pragma GCC unroll 8
  for (int r = 0; r < kRows; ++r)
#pragma GCC unroll 8
    for (int h = 0; h < 2; ++h) acc[r][h] = _mm256_load_ps(y + r * kTileN + 8 * h);
  for (int64_t k = 0; k < len; ++k) {
    const __m256 w0 = _mm256_load_ps(wf + k * kTileN), w1 = _mm256_load_ps(wf + k * kTileN + 8);
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) {
      const __m256 x = _mm256_broadcast_ss(a + r * lda + k);
      acc[r][0] = _mm256_fmadd_ps(x, w0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(x, w1, acc[r][1]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < kRows; ++r) {
    Pin(acc[r][0]);
    Pin(acc[r][1]);
  }
#pragma GCC unroll 8
  for (int r = 0; r < kRows; ++r)
#pragma GCC unroll 8
    for (int h = 0; h < 2; ++h) _mm256_store_ps(y + r * kTileN + 8 * h, acc[r][h]);
}

void BlockFloat(const MatMulArgs& args, const float* wf, const KBlock& b, int64_t m0, int64_t rows,
                float* y) {
  const float* a = args.a_f32 + m0 * args.lda + b.offset;
  const int64_t lda = args.lda;
  int64_t r = 0;
  for (; r + kFloatRowBlock <= rows; r += kFloatRowBlock)
    FmaRows<kFloatRowBlock>(wf, b.length, a + r * lda, lda, y + r * kTileN);
  switch (rows - r) {
    case 5:
      return FmaRows<5>(wf, b.length, a + r * lda, lda, y + r * kTileN);
    case 4:
      return FmaRows<4>(wf, b.length, a + r * lda, lda, y + r * kTileN);
    case 3:
      return FmaRows<3>(wf, b.length, a + r * lda, lda, y + r * kTileN);
    case 2:
      return FmaRows<2>(wf, b.length, a + r * lda, lda, y + r * kTileN);
    case 1:
      return FmaRows<1>(wf, b.length, a + r * lda, lda, y + r * kTileN);
    default:
      return;
  }
}

// wf[r][8h ..] = scale * (code - zero) for the 4 k of one step (v: u8 codes, lane 4c + r).
inline void DequantStep(__m256i v, const GroupParams& p, int h, float* wf) {
#pragma GCC unroll 8
  for (int r = 0; r < 4; ++r) {
    const __m256i code = _mm256_and_si256(_mm256_srli_epi32(v, 8 * r), _mm256_set1_epi32(0xff));
    const __m256 x = _mm256_sub_ps(_mm256_cvtepi32_ps(code), p.zero[h]);
    _mm256_store_ps(wf + r * kTileN + 8 * h, _mm256_mul_ps(x, p.scale[h]));
  }
}

template <int kBits>
void FillFloatTile(const WeightView& w, const Tile16Params<kBits>* reader, int64_t t,
                   const KBlock& b, float* wf) {
  if constexpr (kBits == 0) {
    DequantTileF32(w, t, b, wf);
  } else {
    const int64_t sb_bytes = 32 * kBits;
    const uint8_t* sb = w.B + (t * w.fmt.k_stored() + b.offset) / kKAlign * sb_bytes;
    const GroupParams params = reader->Load(t, b.group);
    for (int64_t k = 0; k < b.length; k += kKAlign, sb += sb_bytes) {
#pragma GCC unroll 4
      for (int s = 0; s < 4; ++s)
#pragma GCC unroll 8
        for (int h = 0; h < 2; ++h)
          DequantStep(UnpackStep<kBits>(sb, s, h), params, h, wf + (k + 4 * s) * kTileN);
    }
  }
}

template <int kBits>
void PrefillFloat(const MatMulArgs& args, int64_t tile_begin, int64_t tile_end, int64_t m0,
                  int64_t rows) {
  alignas(64) float wf[kActBlockMax * kTileN];
  alignas(64) float y[kPrefillRows * kTileN];
  const Tile16Params<kBits ? kBits : 8> reader(*args.w, 0.0f);
  for (int64_t t = tile_begin; t < tile_end; ++t) {
    std::memset(y, 0, static_cast<size_t>(rows) * kTileN * sizeof(float));
    for (int64_t bi = 0; bi < args.n_blocks; ++bi) {
      const KBlock& b = args.blocks[bi];
      if constexpr (kBits == 0)
        FillFloatTile<0>(*args.w, nullptr, t, b, wf);
      else
        FillFloatTile<kBits>(*args.w, &reader, t, b, wf);
      BlockFloat(args, wf, b, m0, rows, y);
    }
    for (int64_t r = 0; r < rows; ++r) {
      const __m256 acc[2] = {_mm256_load_ps(y + r * kTileN), _mm256_load_ps(y + r * kTileN + 8)};
      StoreRow(args, m0 + r, t, acc);
    }
  }
}

// ------------------------------------------------------------------------------------------
// Dispatch on (bits, rows).

template <int kBits>
void DecodeInt8Rows(const MatMulArgs& args, int64_t t0, int64_t t1, int64_t m0, int64_t rows) {
  switch (rows) {
    case 1:
      return DecodeInt8<kBits, 1>(args, t0, t1, m0);
    case 2:
      return DecodeInt8<kBits, 2>(args, t0, t1, m0);
    case 3:
      return DecodeInt8<kBits, 3>(args, t0, t1, m0);
    default:
      return DecodeInt8<kBits, 4>(args, t0, t1, m0);
  }
}

template <int kBits>
void DecodeFloatRows(const MatMulArgs& args, int64_t t0, int64_t t1, int64_t m0, int64_t rows) {
  float* ap = DecodeFloatBuffer(static_cast<size_t>(rows * args.w->fmt.k_stored()));
  PrescaleActivations(args, m0, rows, ap);
  switch (rows) {
    case 1:
      return DecodeFloat<kBits, 1>(args, t0, t1, m0, ap);
    case 2:
      return DecodeFloat<kBits, 2>(args, t0, t1, m0, ap);
    case 3:
      return DecodeFloat<kBits, 3>(args, t0, t1, m0, ap);
    default:
      return DecodeFloat<kBits, 4>(args, t0, t1, m0, ap);
  }
}

// kBits: native TILE16 uniform grid of that width, or 0 for the portable canonical tiles.
template <int kBits>
void MatMulBits(const MatMulArgs& args, int64_t t0, int64_t t1, int64_t m0, int64_t m1) {
  const bool int8 = args.path == ComputePath::kInt8;
  const bool fused = kBits != 0 && m1 - m0 <= kDecodeMaxRows;
  for (int64_t m = m0; m < m1; m += kPrefillRows) {
    const int64_t rows = MinI64(kPrefillRows, m1 - m);
    if constexpr (kBits != 0) {
      if (fused) {
        if (int8)
          DecodeInt8Rows<kBits>(args, t0, t1, m, rows);
        else
          DecodeFloatRows<kBits>(args, t0, t1, m, rows);
        continue;
      }
    }
    if (int8)
      PrefillInt8<kBits>(args, t0, t1, m, rows);
    else
      PrefillFloat<kBits>(args, t0, t1, m, rows);
  }
}

// Every uniform-grid TILE16 weight is native (UnpackStep): bits 2, 3, 4, 5, 6 and 8.
bool IsNative(const WeightView& w, ComputePath) {
  return w.fmt.layout == Layout::kTile16 && !w.codebook;
}

void MatMulAvx2(const MatMulArgs& args, int64_t tile_begin, int64_t tile_end, int64_t row_begin,
                int64_t row_end) {
  if (row_end <= row_begin || tile_end <= tile_begin) return;
  const WeightView& w = *args.w;
  switch (IsNative(w, args.path) ? w.fmt.bits : 0) {
    case 2:
      return MatMulBits<2>(args, tile_begin, tile_end, row_begin, row_end);
    case 3:
      return MatMulBits<3>(args, tile_begin, tile_end, row_begin, row_end);
    case 4:
      return MatMulBits<4>(args, tile_begin, tile_end, row_begin, row_end);
    case 5:
      return MatMulBits<5>(args, tile_begin, tile_end, row_begin, row_end);
    case 6:
      return MatMulBits<6>(args, tile_begin, tile_end, row_begin, row_end);
    case 8:
      return MatMulBits<8>(args, tile_begin, tile_end, row_begin, row_end);
    default:
      return MatMulBits<0>(args, tile_begin, tile_end, row_begin, row_end);
  }
}

// ------------------------------------------------------------------------------------------
// Activation quantization, bit-identical to QuantizeActivationsPortable: the same peak (max is
// exact), the same float division, and vcvtps2dq rounds to nearest even like nearbyint under
// the default MXCSR. Bytes are the low 8 bits of each int32, as static_cast<int8_t>.

inline __m256i LowBytesSignExtended(__m256i v) {
  return _mm256_srai_epi32(_mm256_slli_epi32(v, 24), 24);
}

void QuantizeBlock(const float* a, int64_t len, int8_t* q, float* scale, int32_t* sum) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 vpeak = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= len; k += 8)  // max(x, peak) keeps peak where x is NaN, like fmax
    vpeak = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(a + k), abs_mask), vpeak);
  float peak = HorizontalMax(vpeak);
  for (; k < len; ++k) {  // fmax semantics: a NaN leaves peak unchanged
    const float x = __builtin_fabsf(a[k]);
    peak = x > peak ? x : peak;
  }
  const float inv = peak > 0.0f ? 127.0f / peak : 0.0f;
  const __m256 vinv = _mm256_set1_ps(inv);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  __m256i vsum = _mm256_setzero_si256();
  k = 0;
  for (; k + 16 <= len; k += 16) {
    const __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(a + k), vinv));
    const __m256i i1 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(a + k + 8), vinv));
    vsum = _mm256_add_epi32(vsum, _mm256_add_epi32(i0, i1));
    const __m256i p16 = _mm256_packs_epi32(LowBytesSignExtended(i0), LowBytesSignExtended(i1));
    const __m256i p8 = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(p16, p16), order);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k), _mm256_castsi256_si128(p8));
  }
  int32_t s = HorizontalSum(vsum);
  for (; k < len; ++k) {
    const int v = _mm_cvtss_si32(_mm_set_ss(a[k] * inv));
    q[k] = static_cast<int8_t>(v);
    s += v;
  }
  *scale = peak / 127.0f;
  *sum = s;
}

void QuantizeActivationsAvx2(const float* a, int64_t M, int64_t lda, const KBlock* blocks,
                             int64_t n_blocks, int8_t* q, float* scale, int32_t* sum) {
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t bi = 0; bi < n_blocks; ++bi) {
      const KBlock& b = blocks[bi];
      const int64_t at = m * lda + b.offset;
      QuantizeBlock(a + at, b.length, q + at, scale + m * n_blocks + bi, sum + m * n_blocks + bi);
    }
  }
}

// The vector moves of the Hadamard transform (hadamard_simd.h) on ymm.
struct Avx2HadamardOps {
  static constexpr int kLanes = 8;
  using Vec = __m256;
  static Vec Load(const float* p) { return _mm256_loadu_ps(p); }
  static void Store(float* p, Vec v) { _mm256_storeu_ps(p, v); }
  template <int h>
  static Vec Swap(Vec v) {
    if constexpr (h == 1) return _mm256_permute_ps(v, 0xB1);  // [1, 0, 3, 2] in each 128 bits
    if constexpr (h == 2) return _mm256_permute_ps(v, 0x4E);  // [2, 3, 0, 1]
    return _mm256_permute2f128_ps(v, v, 0x01);                 // h == 4: the halves swapped
  }
  static Vec LoadQuads(const float* p, int64_t stride) {
    return _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_loadu_ps(p)), _mm_loadu_ps(p + stride),
                                1);
  }
  static void StoreQuads(float* p, int64_t stride, Vec v) {
    _mm_storeu_ps(p, _mm256_castps256_ps128(v));
    _mm_storeu_ps(p + stride, _mm256_extractf128_ps(v, 1));
  }
};

void HadamardAvx2(float* x, int64_t K) { SimdHadamard<Avx2HadamardOps>::Transform(x, K); }

#if defined(QX_AVX_VNNI)
const KernelTable kAvx2 = {"avx-vnni", MatMulAvx2, QuantizeActivationsAvx2, IsNative, nullptr,
                           HadamardAvx2, AttendDecodeAvx2};
#else
const KernelTable kAvx2 = {"avx2", MatMulAvx2, QuantizeActivationsAvx2, IsNative, nullptr,
                           HadamardAvx2, AttendDecodeAvx2};
#endif

}  // namespace

#if defined(QX_AVX_VNNI)
const KernelTable* AvxVnniKernels() { return &kAvx2; }
#else
const KernelTable* Avx2Kernels() { return &kAvx2; }
#endif

}  // namespace quantx

#else  // not compiled for this ISA (e.g. an ARM build): no table

namespace quantx {
#if defined(QX_AVX_VNNI)
const KernelTable* AvxVnniKernels() { return nullptr; }
#else
const KernelTable* Avx2Kernels() { return nullptr; }
#endif
}  // namespace quantx

#endif
