#include "quantx/matmul.h"

#include <algorithm>
#include <cstring>

#include "kernels/decode.h"
#include "quantx/hadamard.h"

namespace quantx {

ParallelFor SerialFor() {
  return [](int64_t n, const std::function<void(int64_t)>& fn) {
    for (int64_t i = 0; i < n; ++i) fn(i);
  };
}

void InitPlan(MatMulPlan* plan) {
  plan->blocks = MakeKBlocks(plan->w.fmt, kActBlockMax);
  if (plan->rotate) plan->rotate_signs = HadamardSigns(plan->w.fmt.K);
}

namespace {

constexpr int64_t kDecodeRows = 4;    // up to this many rows: weights streamed once per item
constexpr int64_t kRowChunk = 256;    // prefill: rows per work item
constexpr int64_t kMaxItems = 64;     // target number of tile chunks
#ifndef QX_LDA_PAD
#define QX_LDA_PAD 64
#endif
constexpr int64_t kLdaPad = QX_LDA_PAD;  // elements past the stored k axis in every row

constexpr int64_t kMinItemBytes = 32 << 10;  // decode work items stream at least this much
// Activation buffers up to this size are kept per thread between calls (decode calls are
// small and frequent; allocating them each time costs as much as the work).
constexpr size_t kScratchKeepBytes = 1 << 20;

struct Scratch {
  std::vector<float> a_pad, a_scale, y32;
  std::vector<int8_t> a_i8;
  std::vector<int32_t> a_sum;
};

// Room for n elements (contents unspecified: every element read is written first).
template <typename T>
T* Grow(std::vector<T>& v, int64_t n) {
  if (v.size() < static_cast<size_t>(n)) v.resize(static_cast<size_t>(n));
  return v.data();
}

// Copies row m of A onto the stored k axis: groups padded with zeros, input scale applied.
// The element type and the input scale are decided once per group, not per element (a copy
// or conversion, then one scaling pass): with both choices (and a call to the out-of-line
// fp16 conversion) in the loop body, 128 rows of 576 took 0.12 ms in the kernel bench, four
// times the matmul of a 576 x 16 tile after them.
void PadRow(const MatMulPlan& plan, const void* a, ElemType type, int64_t m, float* out) {
  const WeightFormat& f = plan.w.fmt;
  const int64_t K = f.K;
  const float* a32 = static_cast<const float*>(a) + m * K;
  const uint16_t* a16 = static_cast<const uint16_t*>(a) + m * K;
  const float* in_scale = plan.input_scale;
  for (int64_t j = 0; j < f.n_groups(); ++j) {
    const int64_t src = j * f.group(), len = f.group_length(j);
    float* dst = out + f.stored_offset(j);
    if (type == ElemType::kFloat32) {
      std::memcpy(dst, a32 + src, static_cast<size_t>(len) * sizeof(float));
    } else {
      for (int64_t k = 0; k < len; ++k) dst[k] = HalfToFloat(a16[src + k]);
    }
    if (in_scale)
      for (int64_t k = 0; k < len; ++k) dst[k] *= in_scale[src + k];
    std::fill(dst + len, dst + f.stored_length(j), 0.0f);
  }
  std::fill(out + f.k_stored(), out + f.k_stored() + kLdaPad, 0.0f);  // the row padding
}

// PadRow of a rotated weight (plan.rotate): the transform mixes the whole k axis, so the row is
// built on the logical axis first (converted, input scale, signs d), transformed in place
// (quantx/hadamard.h), then scattered into the padded groups as PadRow does. The logical row is
// per-thread scratch: rows are prepared in parallel.
void PadRowRotated(const MatMulPlan& plan, const void* a, ElemType type, int64_t m, float* out) {
  const WeightFormat& f = plan.w.fmt;
  const int64_t K = f.K;
  thread_local std::vector<float> logical;
  float* x = Grow(logical, K);
  const float* d = plan.rotate_signs.data();
  const float* in_scale = plan.input_scale;
  if (type == ElemType::kFloat32) {  // the copy, input scale and signs in one pass
    const float* a32 = static_cast<const float*>(a) + m * K;
    if (in_scale)
      for (int64_t k = 0; k < K; ++k) x[k] = a32[k] * in_scale[k] * d[k];
    else
      for (int64_t k = 0; k < K; ++k) x[k] = a32[k] * d[k];
  } else {
    const uint16_t* a16 = static_cast<const uint16_t*>(a) + m * K;
    for (int64_t k = 0; k < K; ++k) x[k] = HalfToFloat(a16[k]);
    if (in_scale)
      for (int64_t k = 0; k < K; ++k) x[k] *= in_scale[k] * d[k];
    else
      for (int64_t k = 0; k < K; ++k) x[k] *= d[k];
  }
  if (plan.kernels->hadamard)
    plan.kernels->hadamard(x, K);
  else
    HadamardTransform(x, K);
  for (int64_t j = 0; j < f.n_groups(); ++j) {
    const int64_t len = f.group_length(j);
    float* dst = out + f.stored_offset(j);
    std::memcpy(dst, x + j * f.group(), static_cast<size_t>(len) * sizeof(float));
    std::fill(dst + len, dst + f.stored_length(j), 0.0f);
  }
  std::fill(out + f.k_stored(), out + f.k_stored() + kLdaPad, 0.0f);  // the row padding
}

// One plan's share of a RunMatMuls call: its activations prepared, its work items laid out.
struct Prepared {
  MatMulArgs args;
  int64_t tiles = 0, tile_chunk = 1, tile_items = 1, row_chunk = 1, row_items = 1;
  int64_t items() const { return row_items * tile_items; }
};

// Pads, scales and (int8 path) quantizes A for `plan` into `s`; lays out the work items.
Prepared Prepare(const MatMulPlan& plan, const void* a, ElemType type, int64_t M, Scratch& s,
                 float* y32, void* y, const ParallelFor& parallel_for) {
  const WeightFormat& f = plan.w.fmt;
  // Row stride: the stored k axis plus 64 elements, so that rows 4 KB apart (K = 1024, 4096,
  // ...) do not all fall into one L1 set when a microkernel walks several rows at once.
  const int64_t ks = f.k_stored() + kLdaPad;
  const int64_t nb = static_cast<int64_t>(plan.blocks.size());
  const bool int8 = plan.path == ComputePath::kInt8;
  float* a_pad = Grow(s.a_pad, M * ks);
  int8_t* a_i8 = int8 ? Grow(s.a_i8, M * ks) : nullptr;
  float* a_scale = int8 ? Grow(s.a_scale, M * nb) : nullptr;
  int32_t* a_sum = int8 ? Grow(s.a_sum, M * nb) : nullptr;

  // Activation preparation, by row chunks.
  const int64_t prep_chunk = std::max<int64_t>(1, (1 << 16) / ks);
  const int64_t prep_items = CeilDiv(M, prep_chunk);
  auto prep = [&](int64_t item) {
    const int64_t m0 = item * prep_chunk, m1 = std::min(M, m0 + prep_chunk);
    if (plan.rotate)
      for (int64_t m = m0; m < m1; ++m) PadRowRotated(plan, a, type, m, a_pad + m * ks);
    else
      for (int64_t m = m0; m < m1; ++m) PadRow(plan, a, type, m, a_pad + m * ks);
    if (int8)
      plan.kernels->quantize_activations(a_pad + m0 * ks, m1 - m0, ks, plan.blocks.data(), nb,
                                         a_i8 + m0 * ks, a_scale + m0 * nb, a_sum + m0 * nb);
  };
  if (prep_items == 1)
    prep(0);
  else
    parallel_for(prep_items, prep);

  Prepared p;
  MatMulArgs& args = p.args;
  args.w = &plan.w;
  args.blocks = plan.blocks.data();
  args.n_blocks = nb;
  args.path = plan.path;
  args.M = M;
  args.a_f32 = a_pad;
  args.lda = ks;
  args.a_i8 = a_i8;
  args.a_scale = a_scale;
  args.a_sum = a_sum;
  args.y = y32 ? y32 : static_cast<float*>(y);
  args.ldy = f.N;
  args.bias = plan.bias;

  p.tiles = f.n_tiles();
  p.row_chunk = M <= kDecodeRows ? M : std::min(M, kRowChunk);
  p.row_items = CeilDiv(M, p.row_chunk);
  // Enough items to balance the threads, but each worth its dispatch: decode items stream at
  // least kMinItemBytes of weights.
  const int64_t tile_bytes = f.k_stored() / kKAlign * f.superblock_bytes();
  int64_t tile_chunk = std::max<int64_t>(1, CeilDiv(p.tiles * p.row_items, kMaxItems));
  if (M <= kDecodeRows) tile_chunk = std::max(tile_chunk, CeilDiv(kMinItemBytes, tile_bytes));
  // Items of equal size: 12 tiles in chunks of 8 would leave one thread 8 and the other 4.
  p.tile_items = CeilDiv(p.tiles, tile_chunk);
  p.tile_chunk = CeilDiv(p.tiles, p.tile_items);
  return p;
}

void RunItem(const MatMulPlan& plan, const Prepared& p, int64_t item) {
  const int64_t r = item / p.tile_items, t = item % p.tile_items;
  const int64_t t0 = t * p.tile_chunk, t1 = std::min(p.tiles, t0 + p.tile_chunk);
  const int64_t m0 = r * p.row_chunk, m1 = std::min(p.args.M, m0 + p.row_chunk);
  plan.kernels->matmul(p.args, t0, t1, m0, m1);
}

// Per-thread scratch of the plans of one call (decode calls are small and frequent;
// allocating each time costs as much as the work).
std::vector<Scratch>& ThreadScratches() {
  thread_local std::vector<Scratch> scratches;
  return scratches;
}

}  // namespace

void RunMatMuls(const MatMulPlan* const* plans, const int n, const void* a, ElemType type,
                int64_t M, void* const* ys, const ParallelFor& parallel_for) {
  if (M <= 0 || n <= 0) return;
  std::vector<Scratch>& kept = ThreadScratches();
  if (kept.size() < static_cast<size_t>(n)) kept.resize(static_cast<size_t>(n));
  std::vector<Scratch> local;  // large (prefill) buffers are not kept between calls
  std::vector<Prepared> prepared(static_cast<size_t>(n));
  std::vector<int64_t> first_item(static_cast<size_t>(n) + 1, 0);
  for (int i = 0; i < n; ++i) {
    const WeightFormat& f = plans[i]->w.fmt;
    const int64_t ks = f.k_stored() + kLdaPad;
    Scratch* s = &kept[static_cast<size_t>(i)];
    if (static_cast<size_t>(M * ks) * sizeof(float) > kScratchKeepBytes) {
      if (local.empty()) local.resize(static_cast<size_t>(n));
      s = &local[static_cast<size_t>(i)];
    }
    float* y32 = type == ElemType::kFloat16 ? Grow(s->y32, M * f.N) : nullptr;
    prepared[static_cast<size_t>(i)] = Prepare(*plans[i], a, type, M, *s, y32, ys[i], parallel_for);
    first_item[static_cast<size_t>(i) + 1] =
        first_item[static_cast<size_t>(i)] + prepared[static_cast<size_t>(i)].items();
  }

  // One parallel loop over every plan's work items: a node with several weights pays one
  // dispatch, not one per weight.
  parallel_for(first_item[static_cast<size_t>(n)], [&](int64_t item) {
    int i = 0;
    while (item >= first_item[static_cast<size_t>(i) + 1]) ++i;
    RunItem(*plans[i], prepared[static_cast<size_t>(i)], item - first_item[static_cast<size_t>(i)]);
  });

  if (type == ElemType::kFloat16) {
    for (int i = 0; i < n; ++i) {
      const Prepared& p = prepared[static_cast<size_t>(i)];
      uint16_t* y16 = static_cast<uint16_t*>(ys[i]);
      for (int64_t j = 0; j < M * plans[i]->w.fmt.N; ++j) y16[j] = FloatToHalf(p.args.y[j]);
    }
  }
}

void RunMatMul(const MatMulPlan& plan, const void* a, ElemType type, int64_t M, void* y,
               const ParallelFor& parallel_for) {
  const MatMulPlan* plans[1] = {&plan};
  void* ys[1] = {y};
  RunMatMuls(plans, 1, a, type, M, ys, parallel_for);
}

}  // namespace quantx
