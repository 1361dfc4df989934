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
// once per output instead of once per probability.
#pragma once

#include <immintrin.h>

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

// o[0 .. 8 NV) = inv * sum_t p[t] v_t, the rows v_t of V being 8 NV floats: NV accumulators
// held in registers over the whole pass.
template <int NV>
inline void WeightedSum(const float* p, const float* V, int64_t T, float inv, float* o) {
  __m256 acc[NV];
  for (int v = 0; v < NV; ++v) acc[v] = _mm256_setzero_ps();
  for (int64_t t = 0; t < T; ++t) {
    const __m256 pt = _mm256_set1_ps(p[t]);
    const float* vt = V + t * 8 * NV;
    for (int v = 0; v < NV; ++v) acc[v] = _mm256_fmadd_ps(pt, _mm256_loadu_ps(vt + 8 * v), acc[v]);
  }
  const __m256 inv8 = _mm256_set1_ps(inv);
  for (int v = 0; v < NV; ++v) _mm256_storeu_ps(o + 8 * v, _mm256_mul_ps(acc[v], inv8));
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
  const __m256 scale8 = _mm256_set1_ps(a.scale);

  int64_t t0 = 0;
  if (D % 8 == 0) {
    for (; t0 + 8 <= T; t0 += 8) {
      for (int64_t j = 0; j < G; ++j) {
        const float* qj = q + j * D;
        __m256 acc[8];
        for (int u = 0; u < 8; ++u) acc[u] = _mm256_setzero_ps();
        for (int64_t d = 0; d < D; d += 8) {
          const __m256 qv = _mm256_loadu_ps(qj + d);
          for (int u = 0; u < 8; ++u)
            acc[u] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(K + (t0 + u) * D + d), acc[u]);
        }
        __m256 s = _mm256_mul_ps(Hsum8(acc), scale8);
        if (a.bias) s = _mm256_add_ps(s, _mm256_loadu_ps(a.bias + t0));
        _mm256_storeu_ps(scores + j * T + t0, s);
      }
    }
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

  for (int64_t j = 0; j < G; ++j) {
    float* s = scores + j * T;
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
    const float inv = 1.0f / sum;

    float* o = a.out + j * D;
    if (D == 64) {
      WeightedSum<8>(s, V, T, inv, o);
    } else if (D == 128) {
      WeightedSum<16>(s, V, T, inv, o);
    } else if (D == 32) {
      WeightedSum<4>(s, V, T, inv, o);
    } else {
      for (int64_t d = 0; d < D; ++d) o[d] = 0.0f;
      for (int64_t u = 0; u < T; ++u) {
        const float p = s[u];
        const float* vt = V + u * D;
        for (int64_t d = 0; d < D; ++d) o[d] += p * vt[d];
      }
      for (int64_t d = 0; d < D; ++d) o[d] *= inv;
    }
  }
}

}  // namespace
}  // namespace quantx
