#include "decode.h"

#include <cmath>
#include <cstring>

namespace quantx {

float HalfToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1f;
  uint32_t man = h & 0x3ff;
  uint32_t bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: renormalise
      exp = 127 - 15 + 1;
      while ((man & 0x400) == 0) {
        man <<= 1;
        --exp;
      }
      bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
    }
  } else if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

uint16_t FloatToHalf(float f) {
  uint32_t x;
  std::memcpy(&x, &f, sizeof x);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000);
  const uint32_t ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) return sign | 0x7c00 | (ax > 0x7f800000u ? 0x200 : 0);  // inf/nan
  if (ax >= 0x477ff000u) return sign | 0x7c00;                                    // overflow
  if (ax < 0x38800000u) {  // subnormal or zero: round to nearest even on the 2^-24 grid
    float a;
    std::memcpy(&a, &ax, sizeof a);
    return sign | static_cast<uint16_t>(std::nearbyint(a * 16777216.0f));
  }
  const uint32_t rounded = ax + 0xfffu + ((ax >> 13) & 1u);  // round to nearest even
  return sign | static_cast<uint16_t>((rounded - 0x38000000u) >> 13);
}

namespace {

float ScaleAt(const WeightView& w, int64_t index) {
  return w.scales_f16 ? HalfToFloat(static_cast<const uint16_t*>(w.scales)[index])
                      : static_cast<const float*>(w.scales)[index];
}

// TILE16: code of (column c, stored k) inside the super-block at `sb`.
uint32_t Tile16Code(const uint8_t* sb, int bits, int c, int64_t k_in_sb) {
  const int s = static_cast<int>(k_in_sb >> 2);
  const int lane = c * 4 + static_cast<int>(k_in_sb & 3);
  switch (bits) {
    case 8:
      return sb[s * 64 + lane];
    case 4:
    case 5:
    case 6: {  // bits 0-3 as the 4-bit layout, then bit 4 as 3-bit's masks or bits 4-5 as a plane
      uint32_t v = (sb[(s >> 1) * 64 + lane] >> ((s & 1) * 4)) & 15u;
      if (bits == 5) v |= ((sb[128 + s * 8 + (lane >> 3)] >> (lane & 7)) & 1u) << 4;
      if (bits == 6) v |= ((sb[128 + lane] >> (2 * s)) & 3u) << 4;
      return v;
    }
    default: {
      uint32_t v = (sb[lane] >> (2 * s)) & 3u;
      if (bits == 3) v |= ((sb[64 + s * 8 + (lane >> 3)] >> (lane & 7)) & 1u) << 2;
      return v;
    }
  }
}

}  // namespace

uint32_t CodeAt(const WeightView& w, int64_t n, int64_t group, int64_t ks) {
  const WeightFormat& f = w.fmt;
  if (f.layout == Layout::kTile16) {
    const int64_t sb_bytes = f.superblock_bytes();
    const uint8_t* sb = w.B + ((n / kTileN) * (f.k_stored() / kKAlign) + ks / kKAlign) * sb_bytes;
    return Tile16Code(sb, f.bits, static_cast<int>(n % kTileN), ks % kKAlign);
  }
  const int64_t group_bytes = f.stored_group_stride() * f.bits / 8;
  const uint8_t* stream = w.B + (n * f.n_groups() + group) * group_bytes;
  return ReadBits(stream, ks - f.stored_offset(group), f.bits);
}

void DecodeTileCodes(const WeightView& w, int64_t tile, const KBlock& b, uint8_t* codes) {
  std::memset(codes, 0, static_cast<size_t>(b.length) * kTileN);
  for (int c = 0; c < kTileN; ++c) {
    const int64_t n = tile * kTileN + c;
    if (n >= w.fmt.N) break;
    for (int64_t k = 0; k < b.length; ++k)
      codes[k * kTileN + c] = static_cast<uint8_t>(CodeAt(w, n, b.group, b.offset + k));
  }
}

void DecodeGroupParams(const WeightView& w, int64_t tile, int64_t group, float* scale,
                       float* zero) {
  const WeightFormat& f = w.fmt;
  const int64_t G = f.n_groups();
  const int64_t n_scales = f.scale_bits ? f.n_super() : G;
  const int64_t scale_group = f.scale_bits ? group / f.super_group : group;
  for (int c = 0; c < kTileN; ++c) {
    const int64_t n = tile * kTileN + c;
    if (n >= f.N) {
      scale[c] = 0.0f;
      zero[c] = 0.0f;
      continue;
    }
    const bool tiled = f.layout == Layout::kTile16;
    float s = ScaleAt(w, tiled ? (tile * n_scales + scale_group) * kTileN + c
                               : n * n_scales + scale_group);
    if (f.scale_bits) {
      const uint32_t sub =
          tiled ? ReadBits(w.sub_scales + (tile * G + group) * 2 * f.scale_bits, c, f.scale_bits)
                : ReadBits(w.sub_scales + n * CeilDiv(G * f.scale_bits, 8), group, f.scale_bits);
      s *= static_cast<float>(sub + 1);
    }
    scale[c] = s;
    if (w.codebook) {
      zero[c] = 0.0f;
    } else if (w.zero_points) {
      const uint32_t z =
          tiled ? ReadBits(w.zero_points + (tile * G + group) * 2 * f.bits, c, f.bits)
                : ReadBits(w.zero_points + n * CeilDiv(G * f.bits, 8), group, f.bits);
      zero[c] = static_cast<float>(z);
    } else {
      zero[c] = static_cast<float>(1 << (f.bits - 1));
    }
  }
}

void DequantTileF32(const WeightView& w, int64_t tile, const KBlock& b, float* out) {
  uint8_t codes[kActBlockMax * kTileN];
  float scale[kTileN], zero[kTileN];
  DecodeTileCodes(w, tile, b, codes);
  DecodeGroupParams(w, tile, b.group, scale, zero);
  for (int64_t k = 0; k < b.length; ++k) {
    for (int c = 0; c < kTileN; ++c) {
      const uint8_t q = codes[k * kTileN + c];
      float v;
      if (w.codebook) {
        const int64_t n = tile * kTileN + c;
        const int64_t row = w.codebook_rows == 1 || n >= w.fmt.N ? 0 : n;
        v = w.codebook[row * w.fmt.levels() + q];
      } else {
        v = static_cast<float>(q) - zero[c];
      }
      out[k * kTileN + c] = scale[c] * v;
    }
  }
}

void UnpackTileU8(const WeightView& w, int64_t tile, const KBlock& b, uint8_t* out,
                  float* scale, float* zero) {
  uint8_t codes[kActBlockMax * kTileN];
  DecodeTileCodes(w, tile, b, codes);
  DecodeGroupParams(w, tile, b.group, scale, zero);
  for (int c = 0; c < kTileN; ++c) {
    const int64_t n = tile * kTileN + c;
    const int64_t row = w.codebook_rows == 1 || n >= w.fmt.N ? 0 : n;
    if (w.codebook) {
      scale[c] *= w.codebook_i8_scale[row];
      zero[c] = 128.0f;
    }
    for (int64_t k = 0; k < b.length; ++k) {
      uint8_t v = codes[k * kTileN + c];
      if (w.codebook) v = static_cast<uint8_t>(w.codebook_i8[row * w.fmt.levels() + v] + 128);
      out[(k >> 2) * 64 + c * 4 + (k & 3)] = v;
    }
  }
}

void DequantColumn(const WeightView& w, int64_t n, float* out) {
  const WeightFormat& f = w.fmt;
  const int64_t tile = n / kTileN;
  const int c = static_cast<int>(n % kTileN);
  const int64_t row = w.codebook_rows == 1 ? 0 : n;
  float scale[kTileN], zero[kTileN];
  for (int64_t j = 0; j < f.n_groups(); ++j) {
    DecodeGroupParams(w, tile, j, scale, zero);
    const int64_t len = f.group_length(j), start = f.stored_offset(j);
    for (int64_t k = 0; k < len; ++k) {
      const uint32_t q = CodeAt(w, n, j, start + k);
      const float v = w.codebook ? w.codebook[row * f.levels() + q] : static_cast<float>(q) - zero[c];
      out[j * f.group() + k] = scale[c] * v;
    }
  }
}

CodebookTables MakeCodebookTables(const void* data, bool is_f16, int64_t rows, int levels) {
  CodebookTables t;
  t.rows = rows;
  t.values.resize(static_cast<size_t>(rows * levels));
  t.values_i8.resize(t.values.size());
  t.scale_i8.resize(static_cast<size_t>(rows));
  for (int64_t i = 0; i < rows * levels; ++i)
    t.values[i] = is_f16 ? HalfToFloat(static_cast<const uint16_t*>(data)[i])
                         : static_cast<const float*>(data)[i];
  for (int64_t r = 0; r < rows; ++r) {
    float peak = 0.0f;
    for (int q = 0; q < levels; ++q) peak = std::fmax(peak, std::fabs(t.values[r * levels + q]));
    const float inv = peak > 0.0f ? 127.0f / peak : 0.0f;
    t.scale_i8[r] = peak / 127.0f;
    for (int q = 0; q < levels; ++q)
      t.values_i8[r * levels + q] =
          static_cast<int8_t>(std::nearbyint(t.values[r * levels + q] * inv));
  }
  return t;
}

}  // namespace quantx
