// The forward randomized Hadamard transform (quantx/hadamard.h) on one ISA's vectors: the
// kernel tables' `hadamard` entry, which the driver runs on every activation row of a rotated
// weight. The same additions in the same order as HadamardTransform (hadamard.cc), so the
// results are bit-identical: the butterflies of strides 1, 2, 4, ... in turn, then the H_12
// passes by increasing stride (each output summed over i = 0..11 in order), then the scale
// 1 / sqrt(K). What changes is how many lanes each step fills:
// - butterflies of strides below the vector width are lane permutes inside each vector;
// - the first H_12 pass of K = 12^a * 4 (stride 4: SmolLM2's 576) gathers the 4-float rows of
//   kLanes / 4 blocks of 48 into one vector (the reference fills 4 lanes there);
// - the last H_12 pass multiplies by 1 / sqrt(K) as it stores (the reference: a pass of its own).
// Other K (fewer factors 2 than a vector has lanes, but for 12^a * 4 with enough blocks of 48
// to fill a vector) fall back to HadamardTransform.
//
// Ops supplies the vector type and its moves (kernel_avx2.cc, kernel_avx512.cc):
//   kLanes; Vec; Load(p), Store(p, v); Swap<h>(v) (lane i gets lane i ^ h, h < kLanes);
//   LoadQuads(p, stride), StoreQuads(p, stride, v) (lanes 4g..4g+3 <-> p + g * stride).
#pragma once

#include <cmath>
#include <cstdint>

#include "../hadamard12.h"
#include "quantx/hadamard.h"

namespace quantx {
namespace {  // internal linkage: each ISA file compiles its own copy with its own flags

template <class Ops>
struct SimdHadamard {
  using Vec = typename Ops::Vec;
  static constexpr int L = Ops::kLanes;

  // Butterflies at lane stride h < L: lane i gets x[i] + x[i ^ h] where bit h of i is clear and
  // x[i ^ h] - x[i] where it is set (-x[i] + x[i ^ h]: the same rounding as the subtraction).
  template <int h>
  static Vec LaneButterfly(Vec v) {
    float s[L];
    for (int i = 0; i < L; ++i) s[i] = (i & h) ? -1.0f : 1.0f;
    return v * Ops::Load(s) + Ops::template Swap<h>(v);
  }

  // Every butterfly stage of stride < min(L, run) on one vector (runs of `run` = 2^b lanes).
  static Vec InVector(Vec v, int64_t run) {
    if (run > 1) v = LaneButterfly<1>(v);
    if (run > 2) v = LaneButterfly<2>(v);
    if constexpr (L > 4) {
      if (run > 4) v = LaneButterfly<4>(v);
    }
    if constexpr (L > 8) {
      if (run > 8) v = LaneButterfly<8>(v);
    }
    return v;
  }

  // y[j] = sum_i in[i] * H_12[i][j], i = 0..11 in order; times `scale` where kScale.
  template <bool kScale>
  static void Point12(const Vec (&in)[12], Vec (&out)[12], Vec scale) {
#pragma GCC unroll 12
    for (int j = 0; j < 12; ++j) {
      Vec acc = h12::kH.v[0][j] > 0 ? in[0] : -in[0];
#pragma GCC unroll 11
      for (int i = 1; i < 12; ++i) acc = h12::kH.v[i][j] > 0 ? acc + in[i] : acc - in[i];
      out[j] = kScale ? acc * scale : acc;
    }
  }

  // The H_12 factor of stride s (a multiple of L), L lanes at a time.
  template <bool kScale>
  static void Pass12(float* x, int64_t K, int64_t s, Vec scale) {
    for (int64_t base = 0; base < K; base += 12 * s)
      for (int64_t t = 0; t < s; t += L) {
        float* p = x + base + t;
        Vec in[12], out[12];
        for (int i = 0; i < 12; ++i) in[i] = Ops::Load(p + i * s);
        Point12<kScale>(in, out, scale);
        for (int j = 0; j < 12; ++j) Ops::Store(p + j * s, out[j]);
      }
  }

  // K = 12^a * 4: the butterflies of strides 1 and 2 and the H_12 factor of stride 4, in one
  // pass over groups of L / 4 blocks of 48 floats (one 4-float row of each block per vector).
  template <bool kScale>
  static void Quads12(float* x, int64_t K, Vec scale) {
    constexpr int64_t kBlock = 48;
    for (int64_t base = 0; base < K; base += kBlock * (L / 4)) {
      float* p = x + base;
      Vec in[12], out[12];
      for (int i = 0; i < 12; ++i) in[i] = InVector(Ops::LoadQuads(p + 4 * i, kBlock), 4);
      Point12<kScale>(in, out, scale);
      for (int j = 0; j < 12; ++j) Ops::StoreQuads(p + 4 * j, kBlock, out[j]);
    }
  }

  // The butterflies of stride h and 2h (one pass), or of h alone (last), h >= L.
  static void Radix4(float* x, int64_t K, int64_t h) {
    for (int64_t i = 0; i < K; i += 4 * h)
      for (int64_t j = i; j < i + h; j += L) {
        const Vec a = Ops::Load(x + j), b = Ops::Load(x + j + h);
        const Vec c = Ops::Load(x + j + 2 * h), d = Ops::Load(x + j + 3 * h);
        Ops::Store(x + j, (a + b) + (c + d));
        Ops::Store(x + j + h, (a - b) + (c - d));
        Ops::Store(x + j + 2 * h, (a + b) - (c + d));
        Ops::Store(x + j + 3 * h, (a - b) - (c - d));
      }
  }
  static void Radix2(float* x, int64_t K, int64_t h) {
    for (int64_t i = 0; i < K; i += 2 * h)
      for (int64_t j = i; j < i + h; j += L) {
        const Vec u = Ops::Load(x + j), v = Ops::Load(x + j + h);
        Ops::Store(x + j, u + v);
        Ops::Store(x + j + h, u - v);
      }
  }

  static void Transform(float* x, int64_t K) {
    int a = 0;
    int64_t pow2 = 0;
    if (!h12::Factor(K, &a, &pow2)) return;  // callers validate K; never a partial transform
    const bool quads = pow2 == 4 && a >= 1 && (K / 48) % (L / 4) == 0;
    if (!(pow2 >= L || quads)) {
      HadamardTransform(x, K);
      return;
    }
    const float inv_s = static_cast<float>(1.0 / std::sqrt(static_cast<double>(K)));
    float inv[L];
    for (float& v : inv) v = inv_s;
    const Vec scale = Ops::Load(inv);
    int64_t s = pow2;  // the stride of the next H_12 factor
    if (quads) {
      if (a == 1)
        Quads12<true>(x, K, scale);
      else
        Quads12<false>(x, K, scale);
      s = 48;
    } else {
      for (int64_t i = 0; i < K; i += L) Ops::Store(x + i, InVector(Ops::Load(x + i), pow2));
      int64_t h = L;
      for (; 4 * h <= pow2; h *= 4) Radix4(x, K, h);
      if (h < pow2) Radix2(x, K, h);
    }
    for (; s < K; s *= 12) {
      if (12 * s == K)
        Pass12<true>(x, K, s, scale);
      else
        Pass12<false>(x, K, s, scale);
    }
    if (a == 0)
      for (int64_t i = 0; i < K; i += L) Ops::Store(x + i, Ops::Load(x + i) * scale);
  }
};

}  // namespace
}  // namespace quantx
