// Driver of QxMatMul (and QxMultiMatMul): prepares activations (padding, input scale, int8
// quantization), splits the output into work items and runs them through a caller-supplied parallel
// loop. Free of ONNX Runtime so that kernel tests and benchmarks can call it directly.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "quantx/kernels.h"

namespace quantx {

// Calls fn(i) for i in [0, n), possibly concurrently.
using ParallelFor = std::function<void(int64_t n, const std::function<void(int64_t)>& fn)>;

ParallelFor SerialFor();

enum class ElemType { kFloat32, kFloat16 };

// Everything about one QxMatMul node that does not change between runs.
struct MatMulPlan {
  WeightView w;
  ComputePath path = ComputePath::kFloat;
  const KernelTable* kernels = nullptr;
  std::vector<KBlock> blocks;
  const float* input_scale = nullptr;  // [K] or nullptr
  const float* bias = nullptr;         // [N] or nullptr
  // Attribute rotate = 1: every row a of A (input_scale applied) becomes
  // (a * d) @ H_K / sqrt(K) before the matmul (quantx/hadamard.h). K must satisfy
  // IsHadamardSize; rotate_signs holds d ([K] of +-1), filled by InitPlan or the caller.
  bool rotate = false;
  std::vector<float> rotate_signs;
};

// Splits the stored k axis into blocks (at most kActBlockMax long, inside one group); with
// rotate, fills rotate_signs.
void InitPlan(MatMulPlan* plan);

// Y[M, N] = A[M, K] * W + bias. A and Y have type `type` (float16 as raw uint16 bits).
void RunMatMul(const MatMulPlan& plan, const void* a, ElemType type, int64_t M, void* y,
               const ParallelFor& parallel_for);

// Y_i[M, N_i] = A[M, K] * W_i + bias_i for n plans of one input (each its own format and
// input scale): every plan's activations are prepared first, then all their work items run
// in one parallel loop. ys[i] has plan i's output type, as A.
void RunMatMuls(const MatMulPlan* const* plans, int n, const void* a, ElemType type, int64_t M,
                void* const* ys, const ParallelFor& parallel_for);

}  // namespace quantx
