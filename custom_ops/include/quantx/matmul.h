// Driver of one QxMatMul: prepares activations (padding, input scale, int8 quantization),
// splits the output into work items and runs them through a caller-supplied parallel loop.
// Free of ONNX Runtime so that kernel tests and benchmarks can call it directly.
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
};

// Splits the stored k axis into blocks (at most kActBlockMax long, inside one group).
void InitPlan(MatMulPlan* plan);

// Y[M, N] = A[M, K] * W + bias. A and Y have type `type` (float16 as raw uint16 bits).
void RunMatMul(const MatMulPlan& plan, const void* a, ElemType type, int64_t M, void* y,
               const ParallelFor& parallel_for);

}  // namespace quantx
