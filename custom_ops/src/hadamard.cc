// The fast randomized Hadamard transform; quantx/hadamard.h states the definition (signs, H_2,
// H_12 by the Paley construction, Kronecker order) that the numpy reference builds densely.
#include "quantx/hadamard.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "hadamard12.h"

namespace quantx {
namespace {

using H12 = h12::Table;
constexpr const H12& kH12 = h12::kH;
constexpr const H12& kH12T = h12::kHT;  // H_12^T, for the inverse of the transform

using h12::Factor;

// One factor H_12 along the axis of stride s, W offsets t at a time (W divides s): for every
// block of 12 * s elements, y[j * s + t] = sum_i x[i * s + t] * H[i][j] (H = H_12 or, for the
// transposed transform, H_12^T). The W lanes of the 12 inputs stay in registers (W = 4 or 8:
// one or two SIMD vectors) while the 12 outputs are formed.
template <int W, const H12& kH>
void Pass12(float* x, int64_t K, int64_t s) {
  for (int64_t base = 0; base < K; base += 12 * s)
    for (int64_t t0 = 0; t0 < s; t0 += W) {
      float* p = x + base + t0;
      float in[12][W];
#pragma GCC unroll 12
      for (int i = 0; i < 12; ++i)
        for (int t = 0; t < W; ++t) in[i][t] = p[i * s + t];
#pragma GCC unroll 12
      for (int j = 0; j < 12; ++j) {
        float acc[W];
        for (int t = 0; t < W; ++t) acc[t] = in[0][t] * static_cast<float>(kH.v[0][j]);
#pragma GCC unroll 11
        for (int i = 1; i < 12; ++i)
          for (int t = 0; t < W; ++t) acc[t] += in[i][t] * static_cast<float>(kH.v[i][j]);
        for (int t = 0; t < W; ++t) p[j * s + t] = acc[t];
      }
    }
}

// Four floats as one SIMD vector (GCC / Clang vector extension: SSE on x86-64, NEON on Arm).
// The butterflies of strides 1 and 2 mix the lanes of a vector; a scalar pass for them took
// as long as all the larger strides of K = 4096 together.
typedef float V4 __attribute__((vector_size(16)));
#if defined(__clang__)
#define QX_SHUFFLE4(v, a, b, c, d) __builtin_shufflevector(v, v, a, b, c, d)
#else
typedef int V4i __attribute__((vector_size(16)));
#define QX_SHUFFLE4(v, a, b, c, d) __builtin_shuffle(v, V4i{a, b, c, d})
#endif

inline V4 Load4(const float* p) {
  V4 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void Store4(float* p, V4 v) { std::memcpy(p, &v, sizeof v); }

// H_2 (x) H_2 on the lanes of v = [a, b, c, d] (the butterflies of strides 1 and 2):
// [a + b, a - b, c + d, c - d] = [A, B, C, D], then [A + C, B + D, A - C, B - D]. The
// multiplications by +-1 are exact: the same values as the scalar butterflies.
inline V4 H4Lanes(V4 v) {
  const V4 s1 = {1.0f, -1.0f, 1.0f, -1.0f}, s2 = {1.0f, 1.0f, -1.0f, -1.0f};
  v = v * s1 + QX_SHUFFLE4(v, 1, 0, 3, 2);
  return v * s2 + QX_SHUFFLE4(v, 2, 3, 0, 1);
}

// The butterflies of strides 1 and 2 on every run of 4.
void Radix4Lanes(float* x, int64_t K) {
  for (int64_t i = 0; i < K; i += 4) Store4(x + i, H4Lanes(Load4(x + i)));
}

// The butterflies of strides 1, 2, 4 and 8 on every run of 16, in registers.
void Radix16Lanes(float* x, int64_t K) {
  for (int64_t i = 0; i < K; i += 16) {
    const V4 a = H4Lanes(Load4(x + i)), b = H4Lanes(Load4(x + i + 4));
    const V4 c = H4Lanes(Load4(x + i + 8)), d = H4Lanes(Load4(x + i + 12));
    Store4(x + i, (a + b) + (c + d));
    Store4(x + i + 4, (a - b) + (c - d));
    Store4(x + i + 8, (a + b) - (c + d));
    Store4(x + i + 12, (a - b) - (c - d));
  }
}

// H_2 (x) H_2 along the axes of strides h and 2h (two butterfly stages in one pass over x).
void Radix4(float* x, int64_t K, int64_t h) {
  for (int64_t i = 0; i < K; i += 4 * h) {
    float* p = x + i;
    for (int64_t j = 0; j < h; ++j) {
      const float a = p[j], b = p[j + h], c = p[j + 2 * h], d = p[j + 3 * h];
      p[j] = (a + b) + (c + d);
      p[j + h] = (a - b) + (c - d);
      p[j + 2 * h] = (a + b) - (c + d);
      p[j + 3 * h] = (a - b) - (c - d);
    }
  }
}

// H_2 along the axis of stride h.
void Radix2(float* x, int64_t K, int64_t h) {
  for (int64_t i = 0; i < K; i += 2 * h)
    for (int64_t j = i; j < i + h; ++j) {
      const float u = x[j], v = x[j + h];
      x[j] = u + v;
      x[j + h] = u - v;
    }
}

}  // namespace

bool IsHadamardSize(int64_t K) {
  int a = 0;
  int64_t pow2 = 0;
  return Factor(K, &a, &pow2);
}

int Hadamard12(int i, int j) { return kH12.v[i][j]; }

std::vector<float> HadamardSigns(int64_t K) {
  std::vector<float> d(static_cast<size_t>(std::max<int64_t>(K, 0)));
  uint32_t s = 0x2545F491u;
  for (float& v : d) {
    s ^= s << 13;
    s ^= s >> 17;
    s ^= s << 5;
    v = (s >> 31) ? -1.0f : 1.0f;
  }
  return d;
}

namespace {

// One factor H_12 (or H_12^T) along the axis of stride s, with the widest lanes s allows.
template <const H12& kH>
void Pass12Any(float* x, int64_t K, int64_t s) {
  if (s % 8 == 0)
    Pass12<8, kH>(x, K, s);
  else if (s % 4 == 0)
    Pass12<4, kH>(x, K, s);
  else if (s % 2 == 0)
    Pass12<2, kH>(x, K, s);
  else
    Pass12<1, kH>(x, K, s);
}

}  // namespace

void HadamardTransform(float* x, int64_t K, bool transposed) {
  int a = 0;
  int64_t pow2 = 1;
  if (!Factor(K, &a, &pow2)) return;  // callers validate K; never a partial transform
  // The H_2 factors are the least significant axes: butterflies of strides 1, 2, ..., 2^(b-1)
  // (4h divides 2^b, so a pass never crosses a run of 2^b), two to four stages per pass.
  int64_t h = 1;
  if (pow2 >= 16) {
    Radix16Lanes(x, K);
    h = 16;
  } else if (pow2 >= 4) {
    Radix4Lanes(x, K);
    h = 4;
  }
  for (; 4 * h <= pow2; h *= 4) Radix4(x, K, h);
  if (h < pow2) Radix2(x, K, h);
  // H_12 factor f (of a, most significant first) has stride 12^(a - 1 - f) * 2^b; the lanes
  // of a pass are the largest power of two (up to 8) that divides the stride. H_K^T is the
  // same Kronecker product of the transposed factors (H_2 is symmetric).
  for (int64_t s = pow2; s < K; s *= 12) {
    if (transposed)
      Pass12Any<kH12T>(x, K, s);
    else
      Pass12Any<kH12>(x, K, s);
  }
  if (K > 1) {
    const float inv = static_cast<float>(1.0 / std::sqrt(static_cast<double>(K)));
    for (int64_t k = 0; k < K; ++k) x[k] *= inv;
  }
}

}  // namespace quantx
