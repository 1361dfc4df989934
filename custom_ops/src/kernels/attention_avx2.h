// One decode step of grouped-query attention on AVX2 + FMA vectors: the kernel tables'
// `attend_decode` entry (quantx/kernels.h), which QxGroupQueryAttention runs for a one-token
// step whose KV cache is shared between past and present. Included by kernel_avx2.cc (and so
// kernel_avxvnni.cc) and kernel_avx512.cc, each compiling its own copy with its own flags.
//
// For one (batch row, KV head): the new key is rotated (rotate-half rotary) and appended with
// the new value at position length - 1 of the cache, the group's query heads are rotated, then
//   scores[j][t] = scale * q_j . k_t + bias[t]           t < length
//   out_j        = sum_t softmax_t(scores[j]) v_t
// The scores take 8 keys at a time (one FMA per key and 8 lanes of head_dim, the 8 sums
// reduced by one hadd tree), the exponential is a degree-6 polynomial on 2^n (relative error
// under 2e-7; inputs under -87.3, masked positions, give 0), and the normalization is applied
// once per output instead of once per probability. In AVX-512 builds (32 vector registers)
// three query heads share each pass over the keys and over the values (kHeadsPerPass).
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "quantx/kernels.h"

namespace quantx {
namespace {  // internal linkage: each ISA file compiles its own copy with its own flags

inline __m256 ExpAvx2(__m256 x) {
  const __m256 masked = _mm256_cmp_ps(x, _mm256_set1_ps(-87.3f), _CMP_LT_OQ);
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
  const __m256 fn = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  // r = x - n ln 2, ln 2 in two parts so that n * hi is exact
  __m256 r = _mm256_fnmadd_ps(fn, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(fn, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e =
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fn), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(masked, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

// out = rotate_half(x) at the position whose cos/sin rows are given ([half] each).
inline void RotateHalf(const float* x, const float* cos, const float* sin, int64_t half,
                       float* out) {
  for (int64_t i = 0; i < half; ++i) {
    const float a = x[i], b = x[i + half];
    out[i] = a * cos[i] - b * sin[i];
    out[i + half] = b * cos[i] + a * sin[i];
  }
}

// The sums of a[0..7] (each 8 lanes) as one vector, lane u = sum of a[u].
inline __m256 Hsum8(const __m256 (&a)[8]) {
  const __m256 s01 = _mm256_hadd_ps(a[0], a[1]), s23 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 s45 = _mm256_hadd_ps(a[4], a[5]), s67 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 s03 = _mm256_hadd_ps(s01, s23), s47 = _mm256_hadd_ps(s45, s67);
  return _mm256_add_ps(_mm256_permute2f128_ps(s03, s47, 0x20),
                       _mm256_permute2f128_ps(s03, s47, 0x31));
}

// Heads of a group handled in one pass over the keys and one over the values: with 32 vector
// registers (AVX-512 builds) three heads' accumulators fit (3 x 8 for 64-wide heads), so each
// key and value row is loaded once for the three; with 16 (AVX2) one head at a time. Each
// head's arithmetic is the same either way: the outputs are bit-identical.
#if defined(__AVX512VL__)
constexpr int kHeadsPerPass = 3;
#else
constexpr int kHeadsPerPass = 1;
#endif

// o_j[0 .. 8 NV) = inv[j] * sum_t p_j[t] v_t for H heads (p_j = p + j * ld, o_j = o + j * D),
// the rows v_t of V being 8 NV floats: H x NV accumulators held in registers over the pass.
template <int NV, int H>
__attribute__((always_inline)) inline void WeightedSum(const float* p, int64_t ld, const float* V,
                                                       int64_t T, const float* inv, float* o,
                                                       int64_t D) {
  __m256 acc[H][NV];
  for (int j = 0; j < H; ++j)
    for (int v = 0; v < NV; ++v) acc[j][v] = _mm256_setzero_ps();
  for (int64_t t = 0; t < T; ++t) {
    const float* vt = V + t * 8 * NV;
    __m256 pt[H];
    for (int j = 0; j < H; ++j) pt[j] = _mm256_set1_ps(p[j * ld + t]);
    for (int v = 0; v < NV; ++v) {
      const __m256 x = _mm256_loadu_ps(vt + 8 * v);
      for (int j = 0; j < H; ++j) acc[j][v] = _mm256_fmadd_ps(pt[j], x, acc[j][v]);
    }
  }
  for (int j = 0; j < H; ++j) {
    const __m256 inv8 = _mm256_set1_ps(inv[j]);
    for (int v = 0; v < NV; ++v)
      _mm256_storeu_ps(o + j * D + 8 * v, _mm256_mul_ps(acc[j][v], inv8));
  }
}

// scores_j[t] = scale * q_j . k_t + bias[t] for H heads (q_j = q + j * D, scores_j = scores +
// j * ld) and the 8 keys from t0: each key chunk loaded once for the H heads, the 8 sums of a
// head reduced by one hadd tree.
template <int H>
__attribute__((always_inline)) inline void Scores8(const float* q, const float* K, int64_t D,
                                                   int64_t t0, const float* bias, __m256 scale8,
                                                   float* scores, int64_t ld) {
  __m256 acc[H][8];
  for (int j = 0; j < H; ++j)
    for (int u = 0; u < 8; ++u) acc[j][u] = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; d += 8) {
    __m256 qv[H];
    for (int j = 0; j < H; ++j) qv[j] = _mm256_loadu_ps(q + j * D + d);
    for (int u = 0; u < 8; ++u) {
      const __m256 kv = _mm256_loadu_ps(K + (t0 + u) * D + d);
      for (int j = 0; j < H; ++j) acc[j][u] = _mm256_fmadd_ps(qv[j], kv, acc[j][u]);
    }
  }
  for (int j = 0; j < H; ++j) {
    __m256 s = _mm256_mul_ps(Hsum8(acc[j]), scale8);
    if (bias) s = _mm256_add_ps(s, _mm256_loadu_ps(bias + t0));
    _mm256_storeu_ps(scores + j * ld + t0, s);
  }
}

// Scores8 for the keys [0, T8) (a multiple of 8) and all G heads, up to kHeadsPerPass at a
// time; keys outer, so that 8 keys (2 KB at head_dim 64) stay in L1 for every head.
inline void ScoresAllHeads(const float* q, const float* K, int64_t D, int64_t G, int64_t T8,
                           const float* bias, float scale, float* scores, int64_t ld) {
  const __m256 scale8 = _mm256_set1_ps(scale);
  for (int64_t t0 = 0; t0 < T8; t0 += 8) {
    for (int64_t j = 0; j < G;) {
      const int64_t h = std::min<int64_t>(kHeadsPerPass, G - j);
      const float* qj = q + j * D;
      float* sj = scores + j * ld;
      if (h >= 3) {
        Scores8<3>(qj, K, D, t0, bias, scale8, sj, ld);
      } else if (h == 2) {
        Scores8<2>(qj, K, D, t0, bias, scale8, sj, ld);
      } else {
        Scores8<1>(qj, K, D, t0, bias, scale8, sj, ld);
      }
      j += h;
    }
  }
}

// WeightedSum for h (1..3) heads in one pass.
template <int NV>
inline void WeightedSumHeads(const float* p, int64_t ld, const float* V, int64_t T,
                             const float* inv, float* o, int64_t D, int64_t h) {
  if (h >= 3) {
    WeightedSum<NV, 3>(p, ld, V, T, inv, o, D);
  } else if (h == 2) {
    WeightedSum<NV, 2>(p, ld, V, T, inv, o, D);
  } else {
    WeightedSum<NV, 1>(p, ld, V, T, inv, o, D);
  }
}

// s[0..T) <- exp(s - max s); returns 1 / their sum.
inline float SoftmaxInPlace(float* s, int64_t T) {
  float m = s[0];
  for (int64_t t = 1; t < T; ++t) m = s[t] > m ? s[t] : m;
  const __m256 m8 = _mm256_set1_ps(m);
  __m256 sum8 = _mm256_setzero_ps();
  int64_t t = 0;
  for (; t + 8 <= T; t += 8) {
    const __m256 e = ExpAvx2(_mm256_sub_ps(_mm256_loadu_ps(s + t), m8));
    _mm256_storeu_ps(s + t, e);
    sum8 = _mm256_add_ps(sum8, e);
  }
  float tail[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t i = t; i < T; ++i) tail[i - t] = s[i] - m;
  const __m256 e = ExpAvx2(_mm256_loadu_ps(tail));
  _mm256_storeu_ps(tail, e);
  for (int64_t i = t; i < T; ++i) s[i] = tail[i - t];
  float lanes[8];
  _mm256_storeu_ps(lanes, sum8);
  float sum = 0.0f;
  for (int u = 0; u < 8; ++u) sum += lanes[u];
  for (int64_t i = t; i < T; ++i) sum += s[i];
  return 1.0f / sum;
}

void AttendDecodeAvx2(const DecodeAttentionArgs& a) {
  const int64_t D = a.head_dim, T = a.length, G = a.group, half = D / 2;
  float* k_row = a.k_cache + (T - 1) * D;
  if (a.cos) {
    RotateHalf(a.k_new, a.cos, a.sin, half, k_row);
  } else {
    std::memcpy(k_row, a.k_new, D * sizeof(float));
  }
  std::memcpy(a.v_cache + (T - 1) * D, a.v_new, D * sizeof(float));

  float* scores = a.scratch;  // [G][T]
  float* q = scores + G * T;  // [G][D], rotated
  for (int64_t j = 0; j < G; ++j) {
    if (a.cos) {
      RotateHalf(a.q + j * D, a.cos, a.sin, half, q + j * D);
    } else {
      std::memcpy(q + j * D, a.q + j * D, D * sizeof(float));
    }
  }
  const float* K = a.k_cache;
  const float* V = a.v_cache;
  int64_t t0 = 0;
  if (D % 8 == 0) {
    t0 = T / 8 * 8;
    ScoresAllHeads(q, K, D, G, t0, a.bias, a.scale, scores, T);
  }
  for (int64_t t = t0; t < T; ++t) {
    const float* kt = K + t * D;
    for (int64_t j = 0; j < G; ++j) {
      const float* qj = q + j * D;
      float acc = 0.0f;
      for (int64_t d = 0; d < D; ++d) acc += qj[d] * kt[d];
      scores[j * T + t] = acc * a.scale + (a.bias ? a.bias[t] : 0.0f);
    }
  }

  // per pass of up to kHeadsPerPass heads: softmax (the scores become unnormalized
  // probabilities), then one pass over the values
  const int max_heads = D == 64 || D == 32 ? kHeadsPerPass : 1;  // 128: 16 accumulators a head
  for (int64_t j = 0; j < G;) {
    const int64_t h = std::min<int64_t>(max_heads, G - j);
    float inv[kHeadsPerPass];
    for (int64_t i = 0; i < h; ++i) inv[i] = SoftmaxInPlace(scores + (j + i) * T, T);
    const float* p = scores + j * T;
    float* o = a.out + j * D;
    if (D == 64) {
      WeightedSumHeads<8>(p, T, V, T, inv, o, D, h);
    } else if (D == 128) {
      WeightedSumHeads<16>(p, T, V, T, inv, o, D, h);
    } else if (D == 32) {
      WeightedSumHeads<4>(p, T, V, T, inv, o, D, h);
    } else {
      for (int64_t i = 0; i < h; ++i) {
        const float* s = p + i * T;
        float* oi = o + i * D;
        for (int64_t d = 0; d < D; ++d) oi[d] = 0.0f;
        for (int64_t u = 0; u < T; ++u) {
          const float* vt = V + u * D;
          for (int64_t d = 0; d < D; ++d) oi[d] += s[u] * vt[d];
        }
        for (int64_t d = 0; d < D; ++d) oi[d] *= inv[i];
      }
    }
    j += h;
  }
}

}  // namespace
}  // namespace quantx
