// Portable reference kernels: every (bits, layout, compute path), written for clarity. They
// are the fallback on CPUs without a SIMD table and the oracle the SIMD kernels are tested
// against (they are themselves tested against the numpy reference).
#include <cmath>
#include <cstring>

#include "decode.h"
#include "portable.h"

namespace quantx {

void QuantizeActivationsPortable(const float* a, int64_t M, int64_t lda, const KBlock* blocks,
                                 int64_t n_blocks, int8_t* q, float* scale, int32_t* sum) {
  for (int64_t m = 0; m < M; ++m) {
    const float* row = a + m * lda;
    int8_t* qrow = q + m * lda;
    for (int64_t bi = 0; bi < n_blocks; ++bi) {
      const KBlock& b = blocks[bi];
      float peak = 0.0f;
      for (int64_t k = 0; k < b.length; ++k) peak = std::fmax(peak, std::fabs(row[b.offset + k]));
      const float inv = peak > 0.0f ? 127.0f / peak : 0.0f;
      int32_t s = 0;
      for (int64_t k = 0; k < b.length; ++k) {
        const int v = static_cast<int>(std::nearbyint(row[b.offset + k] * inv));
        qrow[b.offset + k] = static_cast<int8_t>(v);
        s += v;
      }
      scale[m * n_blocks + bi] = peak / 127.0f;
      sum[m * n_blocks + bi] = s;
    }
  }
}

void StoreTileRow(const MatMulArgs& args, int64_t m, int64_t tile, const float* acc) {
  const int64_t n0 = tile * kTileN;
  const int64_t count = args.w->fmt.N - n0 < kTileN ? args.w->fmt.N - n0 : kTileN;
  float* y = args.y + m * args.ldy + n0;
  for (int64_t c = 0; c < count; ++c) y[c] = acc[c] + (args.bias ? args.bias[n0 + c] : 0.0f);
}

uint64_t StreamReadPortable(const uint8_t* p, int64_t bytes) {
  uint64_t acc[8] = {0};
  for (int64_t i = 0; i + 64 <= bytes; i += 64)
    for (int j = 0; j < 8; ++j) {
      uint64_t v;
      std::memcpy(&v, p + i + 8 * j, 8);
      acc[j] += v;
    }
  return acc[0] ^ acc[1] ^ acc[2] ^ acc[3] ^ acc[4] ^ acc[5] ^ acc[6] ^ acc[7];
}

namespace {

void MatMulRef(const MatMulArgs& args, int64_t tile_begin, int64_t tile_end, int64_t row_begin,
               int64_t row_end) {
  const WeightView& w = *args.w;
  alignas(64) float wf[kActBlockMax * kTileN];
  alignas(64) uint8_t wu[kActBlockMax * kTileN];
  float scale[kTileN], zero[kTileN];
  for (int64_t t = tile_begin; t < tile_end; ++t) {
    for (int64_t m = row_begin; m < row_end; ++m) {
      float acc[kTileN] = {0};
      for (int64_t bi = 0; bi < args.n_blocks; ++bi) {
        const KBlock& b = args.blocks[bi];
        if (args.path == ComputePath::kFloat) {
          DequantTileF32(w, t, b, wf);
          const float* a = args.a_f32 + m * args.lda + b.offset;
          for (int64_t k = 0; k < b.length; ++k)
            for (int c = 0; c < kTileN; ++c) acc[c] += a[k] * wf[k * kTileN + c];
        } else {
          UnpackTileU8(w, t, b, wu, scale, zero);
          const int8_t* a = args.a_i8 + m * args.lda + b.offset;
          const float sa = args.a_scale[m * args.n_blocks + bi];
          const int32_t isum = args.a_sum[m * args.n_blocks + bi];
          for (int c = 0; c < kTileN; ++c) {
            int32_t dot = 0;
            for (int64_t k = 0; k < b.length; ++k)
              dot += static_cast<int32_t>(wu[(k >> 2) * 64 + c * 4 + (k & 3)]) * a[k];
            acc[c] += scale[c] * sa *
                      (static_cast<float>(dot) - zero[c] * static_cast<float>(isum));
          }
        }
      }
      StoreTileRow(args, m, t, acc);
    }
  }
}

bool RefNative(const WeightView&, ComputePath) { return true; }

const KernelTable kRef = {"ref", MatMulRef, QuantizeActivationsPortable, RefNative,
                          StreamReadPortable};

}  // namespace

const KernelTable* RefKernels() { return &kRef; }

}  // namespace quantx
