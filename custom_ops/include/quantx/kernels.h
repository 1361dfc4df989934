// Kernel interface: one dispatch table per instruction set, one signature for every
// (bits, layout, compute path). The table is filled by one file per ISA (src/kernels/*.cc),
// chosen once by CPU feature detection (src/dispatch.cc).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "quantx/format.h"

namespace quantx {

// Read-only view of one packed weight plus the small tables derived from it once, when the
// kernel is created. Nothing here copies the codes.
struct WeightView {
  WeightFormat fmt;
  const uint8_t* B = nullptr;
  const void* scales = nullptr;  // float16 or float32, see scales_f16
  bool scales_f16 = true;
  const uint8_t* zero_points = nullptr;  // nullptr: symmetric, zero = 2^(bits-1)
  const uint8_t* sub_scales = nullptr;   // hierarchical only
  // Codebook (non-uniform grid): value = scale * codebook[row][code]; row = n or 0.
  const float* codebook = nullptr;  // [codebook_rows][levels]
  int64_t codebook_rows = 0;
  // Int8 path: codebook entries as int8 (round(cb * 127 / max|cb_row|)), and the factor
  // max|cb_row| / 127 that brings them back to codebook units.
  const int8_t* codebook_i8 = nullptr;
  const float* codebook_i8_scale = nullptr;
};

// Derived codebook tables (owned by the op kernel, referenced by WeightView).
struct CodebookTables {
  std::vector<float> values;     // [rows][levels] float32
  std::vector<int8_t> values_i8; // [rows][levels]
  std::vector<float> scale_i8;   // [rows]
  int64_t rows = 0;
};
// Builds the tables from a codebook given as float32 or float16 (raw bits) data.
CodebookTables MakeCodebookTables(const void* data, bool is_f16, int64_t rows, int levels);

// Arguments of one matmul: Y[M, N] = A[M, K] * W + bias. Activations are given on the
// "stored" k axis (groups padded to multiples of 16 with zeros), as floats or int8.
// Preconditions kernels may rely on:
//  - int8 activations lie in [-127, 127] (symmetric quantization never yields -128), which
//    keeps sign tricks and int16 partial sums exact;
//  - lda is a multiple of 16 elements and rows do not alias in L1 (the driver pads lda);
//  - a call runs on one thread; kernels may keep up to ~64 KB of scratch on the stack.
struct MatMulArgs {
  const WeightView* w = nullptr;
  const KBlock* blocks = nullptr;  // activation blocks over the stored k axis
  int64_t n_blocks = 0;
  ComputePath path = ComputePath::kFloat;
  int64_t M = 0;
  // float path: A[M][lda], lda >= k_stored
  const float* a_f32 = nullptr;
  int64_t lda = 0;
  // int8 path: A8[M][lda], scale and sum [M][n_blocks]: a ~= a_scale * a_i8 per block
  const int8_t* a_i8 = nullptr;
  const float* a_scale = nullptr;
  const int32_t* a_sum = nullptr;
  float* y = nullptr;  // [M][ldy]; columns [0, N) are written
  int64_t ldy = 0;
  const float* bias = nullptr;  // [N] or nullptr
};

// Computes Y for column tiles [tile_begin, tile_end) and rows [row_begin, row_end).
using MatMulFn = void (*)(const MatMulArgs& args, int64_t tile_begin, int64_t tile_end,
                          int64_t row_begin, int64_t row_end);

// Int8 path: quantizes rows of A (on the stored k axis) per block, symmetric absmax:
// scale = max|a| / 127, q = nearbyint(a * (127 / max|a|)), sum = sum of q.
using QuantizeActFn = void (*)(const float* a, int64_t M, int64_t lda, const KBlock* blocks,
                               int64_t n_blocks, int8_t* q, float* scale, int32_t* sum);

// One decode step (a single new token) of grouped-query attention for one batch row and one
// KV head, the cache shared between past and present: the new key (rotated) and value are
// written at position length - 1 of the caches, then each of the group's query heads j gets
//   out_j = softmax_t(scale * rot(q_j) . k_t + bias[t]) v_t,  t < length.
// rot is the rotate-half rotary embedding at the token's position (cos/sin rows of head_dim / 2
// values), or none where cos is nullptr.
struct DecodeAttentionArgs {
  int64_t head_dim = 0;
  int64_t group = 0;             // query heads sharing this KV head
  int64_t length = 0;            // valid cache positions after the append, >= 1
  const float* q = nullptr;      // [group][head_dim], before rotary
  const float* k_new = nullptr;  // [head_dim], before rotary
  const float* v_new = nullptr;  // [head_dim]
  float* k_cache = nullptr;      // [capacity][head_dim], capacity >= length
  float* v_cache = nullptr;      // [capacity][head_dim]
  const float* cos = nullptr;    // [head_dim / 2] or nullptr (no rotary)
  const float* sin = nullptr;
  const float* bias = nullptr;  // [length] or nullptr
  float scale = 1.0f;
  float* out = nullptr;      // [group][head_dim]
  float* scratch = nullptr;  // group * (length + head_dim) floats
};
using DecodeAttentionFn = void (*)(const DecodeAttentionArgs& args);

struct KernelTable {
  const char* name;  // "ref", "avx2", "avx-vnni", "avx512", "neon", "neon-dotprod"
  MatMulFn matmul;   // handles every (bits, layout, path); fused fast paths where native
  QuantizeActFn quantize_activations;
  // True where `matmul` reads this weight natively (its own unpacking) rather than through
  // the portable decoder (ROW layout, codebooks, ... on most ISAs).
  bool (*is_native)(const WeightView& w, ComputePath path);
  // Reads `bytes` (a multiple of 64) as fast as this ISA can and returns a checksum: the
  // read-bandwidth roofline benchmarks compare against. nullptr: use StreamReadPortable.
  uint64_t (*stream_read)(const uint8_t* p, int64_t bytes) = nullptr;
  // x[0..K-1] <- x @ H_K / sqrt(K) with this ISA's vectors, bit-identical to
  // HadamardTransform (quantx/hadamard.h). nullptr: use HadamardTransform.
  void (*hadamard)(float* x, int64_t K) = nullptr;
  // One decode step of attention (DecodeAttentionArgs). nullptr: QxGroupQueryAttention hands
  // every step to ONNX Runtime's GroupQueryAttention.
  DecodeAttentionFn attend_decode = nullptr;
};

uint64_t StreamReadPortable(const uint8_t* p, int64_t bytes);

// Tables compiled into this build; nullptr where the ISA is not compiled in.
const KernelTable* RefKernels();
const KernelTable* Avx2Kernels();
const KernelTable* AvxVnniKernels();
const KernelTable* Avx512Kernels();
const KernelTable* NeonKernels();
const KernelTable* NeonDotKernels();

}  // namespace quantx
