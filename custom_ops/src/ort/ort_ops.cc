// ONNX Runtime glue: registers the com.quantx ops (QxGroupQueryAttention's kernel lives in
// attention_op.cc), validates every node when its kernel is created and every input when it
// runs, and reports problems as ORT error statuses naming the node. No exception crosses the C
// API boundary.
#include <atomic>
#include <cstring>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <vector>

#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include "../kernels/decode.h"
#include "ort_common.h"
#include "quantx/dispatch.h"
#include "quantx/hadamard.h"
#include "quantx/matmul.h"
#include "quantx/quantx_ops.h"

#define QX_OPS_EXPORT __attribute__((visibility("default")))

namespace quantx {
namespace {

// Inputs shared by both ops, after the op's first input.
enum WeightInput { kB = 0, kScales, kZeroPoints, kSubScales, kCodebook, kInputScale, kNumWeight };
const char* const kWeightInputNames[kNumWeight] = {"B",        "scales",   "zero_points",
                                                   "sub_scales", "codebook", "input_scale"};

// A weight's format from its attribute values; throws naming the node if they are invalid.
WeightFormat MakeFormat(int64_t K, int64_t N, int64_t bits, int64_t group_size, int64_t layout,
                        int64_t scale_bits, int64_t super_group, const std::string& node,
                        const std::string& op) {
  if (bits < 0 || bits > 64 || layout < 0 || layout > 64 || scale_bits < 0 || scale_bits > 64 ||
      super_group < 0 || super_group > (int64_t{1} << 31))
    Fail(node, op, "attribute out of range");
  WeightFormat f;
  f.K = K;
  f.N = N;
  f.group_size = group_size;
  f.bits = static_cast<int>(bits);
  f.layout = static_cast<Layout>(layout);
  f.scale_bits = static_cast<int>(scale_bits);
  f.super_group = static_cast<int>(super_group);
  const std::string err = f.Validate();
  if (!err.empty()) Fail(node, op, err);
  return f;
}

// Attribute 'rotate' of QxMatMul and QxGather: an int, 0 when absent. One of another type is
// an error, not a silent 0: a weight stored rotated gives wrong results when run unrotated.
int64_t RotateAttr(const Ort::ConstKernelInfo& info, const std::string& node,
                   const std::string& op) {
  int64_t v = 0;
  OrtStatus* st = g_api->KernelInfoGetAttribute_int64(info, "rotate", &v);
  if (!st) return v;
  g_api->ReleaseStatus(st);
  if (HasAttr(info, "rotate", false))
    Fail(node, op, "attribute 'rotate' must be an int (0 or 1)");
  return 0;
}

// A weight's rotate value checked (quantx/hadamard.h): 0 or 1, and 1 only where H_K exists.
bool CheckedRotate(int64_t rotate, int64_t K, const std::string& node, const std::string& op) {
  if (rotate != 0 && rotate != 1)
    Fail(node, op, "attribute 'rotate' must be 0 or 1, got " + std::to_string(rotate));
  if (rotate && !IsHadamardSize(K))
    Fail(node, op, "attribute 'rotate' = 1 needs K = 12^a * 2^b, got K=" + std::to_string(K));
  return rotate == 1;
}

// Attributes common to QxMatMul and QxGather.
WeightFormat ReadFormat(const Ort::ConstKernelInfo& info, const std::string& node,
                        const std::string& op) {
  auto get = [&](const char* name, bool required) {
    return IntAttr(info, name, required, 0, node, op);
  };
  return MakeFormat(get("K", true), get("N", true), get("bits", true), get("group_size", true),
                    get("layout", false), get("scale_bits", false), get("super_group", false), node,
                    op);
}

// Checks every packed weight tensor against the format; throws naming the first problem.
void ValidateWeights(const WeightFormat& f, const Tensor* t, const std::string& node,
                     const std::string& op) {
  const PackedShapes expect = ExpectedShapes(f);
  auto need = [&](int idx, const std::vector<int64_t>& shape, bool is_float) {
    const Tensor& x = t[idx];
    const std::string name = kWeightInputNames[idx];
    if (is_float ? !IsFloat(x.type) : x.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8)
      Fail(node, op, "input '" + name + "' must be " + (is_float ? "float or float16" : "uint8"));
    if (x.shape != shape)
      Fail(node, op, "input '" + name + "' has shape " + ShapeStr(x.shape) + ", expected " +
                         ShapeStr(shape) + " for K=" + std::to_string(f.K) +
                         " N=" + std::to_string(f.N) + " bits=" + std::to_string(f.bits) +
                         " group_size=" + std::to_string(f.group_size) +
                         " layout=" + std::to_string(static_cast<int>(f.layout)));
  };
  if (!t[kB].present || !t[kScales].present) Fail(node, op, "inputs 'B' and 'scales' are required");
  need(kB, expect.B, false);
  need(kScales, expect.scales, true);
  if (t[kZeroPoints].present) need(kZeroPoints, expect.zero_points, false);
  if (f.scale_bits) {
    if (!t[kSubScales].present) Fail(node, op, "scale_bits > 0 requires input 'sub_scales'");
    need(kSubScales, expect.sub_scales, false);
  } else if (t[kSubScales].present) {
    Fail(node, op, "input 'sub_scales' given but scale_bits is 0");
  }
  if (t[kCodebook].present) {
    const Tensor& cb = t[kCodebook];
    if (!IsFloat(cb.type)) Fail(node, op, "input 'codebook' must be float or float16");
    if (cb.shape.size() != 2 || (cb.shape[0] != 1 && cb.shape[0] != f.N) ||
        cb.shape[1] != f.levels())
      Fail(node, op, "input 'codebook' has shape " + ShapeStr(cb.shape) + ", expected [1 or " +
                         std::to_string(f.N) + ", " + std::to_string(f.levels()) + "]");
    if (t[kZeroPoints].present) Fail(node, op, "a codebook weight takes no 'zero_points'");
  }
  if (t[kInputScale].present) {
    if (!IsFloat(t[kInputScale].type)) Fail(node, op, "input 'input_scale' must be float");
    if (t[kInputScale].shape != std::vector<int64_t>{f.K})
      Fail(node, op, "input 'input_scale' has shape " + ShapeStr(t[kInputScale].shape) +
                         ", expected [" + std::to_string(f.K) + "]");
  }
}

std::vector<float> ToFloat(const Tensor& t) {
  std::vector<float> out(static_cast<size_t>(t.count()));
  for (size_t i = 0; i < out.size(); ++i)
    out[i] = t.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16
                 ? HalfToFloat(static_cast<const uint16_t*>(t.data)[i])
                 : static_cast<const float*>(t.data)[i];
  return out;
}

// Float vectors derived from small inputs (codebook tables, input scale, bias).
struct Derived {
  CodebookTables codebook;
  std::vector<float> input_scale, bias;
};

void Derive(const WeightFormat& f, const Tensor* w, const Tensor* bias, Derived* d) {
  if (w[kCodebook].present)
    d->codebook =
        MakeCodebookTables(w[kCodebook].data, w[kCodebook].type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
                           w[kCodebook].shape[0], f.levels());
  if (w[kInputScale].present) d->input_scale = ToFloat(w[kInputScale]);
  if (bias && bias->present) d->bias = ToFloat(*bias);
}

WeightView MakeView(const WeightFormat& f, const Tensor* w, const Derived& d) {
  WeightView v;
  v.fmt = f;
  v.B = static_cast<const uint8_t*>(w[kB].data);
  v.scales = w[kScales].data;
  v.scales_f16 = w[kScales].type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
  v.zero_points = static_cast<const uint8_t*>(w[kZeroPoints].data);
  v.sub_scales = static_cast<const uint8_t*>(w[kSubScales].data);
  if (w[kCodebook].present) {
    v.codebook = d.codebook.values.data();
    v.codebook_rows = d.codebook.rows;
    v.codebook_i8 = d.codebook.values_i8.data();
    v.codebook_i8_scale = d.codebook.scale_i8.data();
  }
  return v;
}

// Input `index` of the node if it is a constant initializer (else an absent Tensor). Also
// reports whether the optional input is wired at all.
Tensor ConstantInput(const Ort::ConstKernelInfo& info, size_t index, bool* wired) {
  *wired = index < info.GetInputCount() && !info.GetInputName(index).empty();
  if (!*wired) return Tensor{};
  int is_const = 0;
  Ort::ConstValue v = info.GetTensorConstantInput(index, &is_const);
  return is_const ? Describe(v) : Tensor{};
}

// Weight inputs of a kernel: validated at creation when constant, else on every run.
struct WeightInputs {
  size_t first = 0;  // node input index of 'B'
  bool all_constant = false;
  Tensor constant[kNumWeight];
  Derived derived;

  void Init(const Ort::ConstKernelInfo& info, const WeightFormat& f, size_t first_index,
            const std::string& node, const std::string& op) {
    first = first_index;
    all_constant = true;
    for (int i = 0; i < kNumWeight; ++i) {
      bool wired = false;
      constant[i] = ConstantInput(info, first + i, &wired);
      if (wired && !constant[i].present) all_constant = false;
    }
    if (all_constant) {
      ValidateWeights(f, constant, node, op);
      Derive(f, constant, nullptr, &derived);
    }
  }

  // The weight tensors of this run; validated unless they are the constants checked at creation.
  void Fetch(Ort::KernelContext& ctx, const WeightFormat& f, const std::string& node,
             const std::string& op, Tensor* out, Derived* local) const {
    const size_t n_inputs = ctx.GetInputCount();
    for (int i = 0; i < kNumWeight; ++i)
      out[i] = first + i < n_inputs ? Describe(ctx.GetInput(first + i)) : Tensor{};
    if (!all_constant) {
      ValidateWeights(f, out, node, op);
      Derive(f, out, nullptr, local);
    }
  }
};

// The compute path of attribute accuracy_level: 4 = int8 activations, 0..3 float.
ComputePath ReadPath(const Ort::ConstKernelInfo& info, const std::string& node,
                     const std::string& op) {
  const int64_t level = IntAttr(info, "accuracy_level", false, 0, node, op);
  if (level < 0 || level > 4) Fail(node, op, "accuracy_level must be in [0, 4]");
  return level == 4 ? ComputePath::kInt8 : ComputePath::kFloat;
}

// Input A of a matmul node: float or float16 [..., K]; its row count M.
Tensor CheckedA(Ort::KernelContext& ctx, int64_t K, const std::string& node, const std::string& op,
                int64_t* M) {
  const Tensor a = Describe(ctx.GetInput(0));
  if (!a.present || !IsFloat(a.type)) Fail(node, op, "input 'A' must be float or float16");
  if (a.shape.empty() || a.shape.back() != K)
    Fail(node, op,
         "input 'A' has shape " + ShapeStr(a.shape) + ", expected [..., K=" + std::to_string(K) +
             "]");
  *M = 1;
  for (size_t i = 0; i + 1 < a.shape.size(); ++i) *M *= a.shape[i];
  return a;
}

ElemType ElemOf(const Tensor& a) {
  return a.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT ? ElemType::kFloat32 : ElemType::kFloat16;
}

// ---------------------------------------------------------------------------------------------
// QxMatMul: Y = A @ W + bias
struct MatMulKernel {
  std::string node;
  WeightFormat fmt;
  ComputePath path = ComputePath::kFloat;
  const KernelTable* kernels = nullptr;
  WeightInputs weights;
  size_t bias_index = 0;
  std::vector<KBlock> blocks;
  bool rotate = false;
  std::vector<float> rotate_signs;  // d of the rotation, when rotate
  // When every weight input and the bias are constant initializers, the whole plan is built
  // once here (the tensors live as long as the session) and each run only checks A.
  bool cached = false;
  MatMulPlan plan;
  std::vector<float> bias_values;

  MatMulKernel(const OrtKernelInfo* raw_info) {
    Ort::ConstKernelInfo info(raw_info);
    node = NodeName(info);
    fmt = ReadFormat(info, node, "QxMatMul");
    path = ReadPath(info, node, "QxMatMul");
    rotate = CheckedRotate(RotateAttr(info, node, "QxMatMul"), fmt.K, node, "QxMatMul");
    if (rotate) rotate_signs = HadamardSigns(fmt.K);
    std::string why;
    kernels = SelectKernels(&why);
    if (!kernels) Fail(node, "QxMatMul", why);
    weights.Init(info, fmt, 1, node, "QxMatMul");
    bias_index = 1 + kNumWeight;
    blocks = MakeKBlocks(fmt, kActBlockMax);
    bool bias_wired = false;
    const Tensor bias = ConstantInput(info, bias_index, &bias_wired);
    if (weights.all_constant && (!bias_wired || bias.present)) {
      if (bias.present) bias_values = CheckedBias(bias);
      plan = MakePlan(weights.constant, weights.derived, bias_values);
      cached = true;
    }
  }

  std::vector<float> CheckedBias(const Tensor& bias) const {
    if (!IsFloat(bias.type) || bias.shape != std::vector<int64_t>{fmt.N})
      Fail(node, "QxMatMul", "input 'bias' must be float [" + std::to_string(fmt.N) + "], got " +
                                 ShapeStr(bias.shape));
    return ToFloat(bias);
  }

  MatMulPlan MakePlan(const Tensor* w, const Derived& d, const std::vector<float>& bias) const {
    MatMulPlan p;
    p.w = MakeView(fmt, w, d);
    p.path = path;
    p.kernels = kernels;
    p.blocks = blocks;
    p.input_scale = d.input_scale.empty() ? nullptr : d.input_scale.data();
    p.bias = bias.empty() ? nullptr : bias.data();
    p.rotate = rotate;
    if (rotate) p.rotate_signs = rotate_signs;
    return p;
  }

  void Compute(OrtKernelContext* raw_ctx) const {
    Ort::KernelContext ctx(raw_ctx);
    int64_t M = 0;
    const Tensor a = CheckedA(ctx, fmt.K, node, "QxMatMul", &M);
    MatMulPlan per_call;
    Derived local;
    std::vector<float> bias_f;
    if (!cached) {  // weights or bias are graph inputs: check and view them on every run
      Tensor w[kNumWeight];
      weights.Fetch(ctx, fmt, node, "QxMatMul", w, &local);
      const Derived& d = weights.all_constant ? weights.derived : local;
      Tensor bias;
      if (bias_index < ctx.GetInputCount()) bias = Describe(ctx.GetInput(bias_index));
      if (bias.present) bias_f = CheckedBias(bias);
      per_call = MakePlan(w, d, bias_f);
    }
    const MatMulPlan& run = cached ? plan : per_call;

    std::vector<int64_t> out_shape = a.shape;
    out_shape.back() = fmt.N;
    Ort::UnownedValue y = ctx.GetOutput(0, out_shape.data(), out_shape.size());
    if (M == 0) return;
    RunMatMul(run, a.data, ElemOf(a), M, y.GetTensorMutableRawData(), OrtParallelFor(raw_ctx));
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* ctx) const {
    return Guard([&] { Compute(ctx); });
  }
};

// ---------------------------------------------------------------------------------------------
// QxMultiMatMul: Y_i = A @ W_i + bias_i for 2..kMaxFused weights that read the same A (q/k/v,
// gate/up), each in its own format. One node and one parallel loop instead of one per weight:
// at decode the per-node cost of a small matrix is as large as its arithmetic. Each weight
// takes kFusedSlots inputs after A (QxMatMul's inputs 1..7); its attributes are lists.
constexpr int kMaxFused = 4;
constexpr size_t kFusedSlots = kNumWeight + 1;  // the weight inputs, then the bias

struct MultiMatMulKernel {
  std::string node;
  int64_t K = 0;
  std::vector<WeightFormat> fmts;
  std::vector<WeightInputs> weights;
  std::vector<std::vector<float>> biases;
  std::vector<MatMulPlan> plans;  // point into weights[i].derived and biases[i]

  MultiMatMulKernel(const OrtKernelInfo* raw_info) {
    static const std::string op = "QxMultiMatMul";
    Ort::ConstKernelInfo info(raw_info);
    node = NodeName(info);
    K = IntAttr(info, "K", true, 0, node, op);
    auto list = [&](const char* name, bool required, size_t n) {
      std::vector<int64_t> v;
      try {
        v = info.GetAttributes<int64_t>(name);
      } catch (const Ort::Exception&) {
        if (required) Fail(node, op, std::string("missing required ints attribute '") + name + "'");
        v.assign(n, 0);
      }
      if (n && v.size() != n)
        Fail(node, op,
             std::string("attribute '") + name + "' has " + std::to_string(v.size()) +
                 " values, expected one per weight (" + std::to_string(n) + ")");
      return v;
    };
    const std::vector<int64_t> Ns = list("N", true, 0);
    const size_t n = Ns.size();
    if (n < 2 || n > static_cast<size_t>(kMaxFused))
      Fail(node, op,
           "attribute 'N' must list 2 to " + std::to_string(kMaxFused) + " weights, got " +
               std::to_string(n));
    const auto bits = list("bits", true, n), groups = list("group_size", true, n);
    const auto scale_bits = list("scale_bits", false, n), supers = list("super_group", false, n);
    // rotate: one value per weight, all 0 when absent; a single int or float is refused
    // rather than taken for absent (a rotated weight run unrotated gives wrong results).
    if (HasAttr(info, "rotate", true))
      Fail(node, op, "attribute 'rotate' must be a list of ints, one per weight");
    const auto rotates = list("rotate", false, n);
    const int64_t layout = IntAttr(info, "layout", false, 0, node, op);
    const ComputePath path = ReadPath(info, node, op);
    std::string why;
    const KernelTable* kernels = SelectKernels(&why);
    if (!kernels) Fail(node, op, why);
    if (info.GetInputCount() > 1 + n * kFusedSlots)
      Fail(node, op,
           "has " + std::to_string(info.GetInputCount()) + " inputs, at most " +
               std::to_string(1 + n * kFusedSlots) + " for " + std::to_string(n) + " weights");
    if (info.GetOutputCount() != n)
      Fail(node, op,
           "has " + std::to_string(info.GetOutputCount()) + " outputs, expected one per weight (" +
               std::to_string(n) + ")");

    weights.resize(n);  // sized once: the plans point into them
    biases.resize(n);
    std::vector<bool> rotated(n);
    for (size_t i = 0; i < n; ++i) {
      const std::string which = op + " weight " + std::to_string(i);
      fmts.push_back(
          MakeFormat(K, Ns[i], bits[i], groups[i], layout, scale_bits[i], supers[i], node, which));
      rotated[i] = CheckedRotate(rotates[i], K, node, which);
      const size_t first = 1 + i * kFusedSlots;
      weights[i].Init(info, fmts[i], first, node, which);
      bool bias_wired = false;
      const Tensor bias = ConstantInput(info, first + kNumWeight, &bias_wired);
      if (!weights[i].all_constant || (bias_wired && !bias.present))
        Fail(node, which, "weights and bias must be constant initializers");
      if (bias.present) {
        if (!IsFloat(bias.type) || bias.shape != std::vector<int64_t>{Ns[i]})
          Fail(node, which,
               "input 'bias' must be float [" + std::to_string(Ns[i]) + "], got " +
                   ShapeStr(bias.shape));
        biases[i] = ToFloat(bias);
      }
    }
    for (size_t i = 0; i < n; ++i) {
      MatMulPlan p;
      p.w = MakeView(fmts[i], weights[i].constant, weights[i].derived);
      p.path = path;
      p.kernels = kernels;
      p.blocks = MakeKBlocks(fmts[i], kActBlockMax);
      p.input_scale =
          weights[i].derived.input_scale.empty() ? nullptr : weights[i].derived.input_scale.data();
      p.bias = biases[i].empty() ? nullptr : biases[i].data();
      p.rotate = rotated[i];
      if (p.rotate) p.rotate_signs = HadamardSigns(K);
      plans.push_back(std::move(p));
    }
  }

  void Compute(OrtKernelContext* raw_ctx) const {
    Ort::KernelContext ctx(raw_ctx);
    int64_t M = 0;
    const Tensor a = CheckedA(ctx, K, node, "QxMultiMatMul", &M);
    const size_t n = plans.size();
    std::vector<const MatMulPlan*> run(n);
    std::vector<void*> ys(n);
    for (size_t i = 0; i < n; ++i) {
      std::vector<int64_t> shape = a.shape;
      shape.back() = fmts[i].N;
      ys[i] = ctx.GetOutput(i, shape.data(), shape.size()).GetTensorMutableRawData();
      run[i] = &plans[i];
    }
    if (M == 0) return;
    RunMatMuls(run.data(), static_cast<int>(n), a.data, ElemOf(a), M, ys.data(),
               OrtParallelFor(raw_ctx));
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* ctx) const {
    return Guard([&] { Compute(ctx); });
  }
};

// ---------------------------------------------------------------------------------------------
// QxGather: rows of the embedding table W^T (column n of W is embedding row n). A rotated table
// stores W' = Q^T W (its tied lm_head rotates its activations as QxMatMul does), so row n is
// W'[:, n] @ Q^T = (W'[:, n] @ H_K^T / sqrt(K)) * d, then times input_scale.
struct GatherKernel {
  std::string node;
  WeightFormat fmt;
  WeightInputs weights;
  bool rotate = false;
  std::vector<float> rotate_signs;  // d of the rotation, when rotate
  ONNXTensorElementDataType out_type = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;

  GatherKernel(const OrtKernelInfo* raw_info) {
    Ort::ConstKernelInfo info(raw_info);
    node = NodeName(info);
    fmt = ReadFormat(info, node, "QxGather");
    int64_t dtype = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    OrtStatus* st = g_api->KernelInfoGetAttribute_int64(info, "dtype", &dtype);
    if (st) g_api->ReleaseStatus(st);
    if (dtype != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT && dtype != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16)
      Fail(node, "QxGather", "attribute 'dtype' must be 1 (float) or 10 (float16)");
    out_type = static_cast<ONNXTensorElementDataType>(dtype);
    rotate = CheckedRotate(RotateAttr(info, node, "QxGather"), fmt.K, node, "QxGather");
    if (rotate) rotate_signs = HadamardSigns(fmt.K);
    weights.Init(info, fmt, 1, node, "QxGather");
  }

  void Compute(OrtKernelContext* raw_ctx) const {
    Ort::KernelContext ctx(raw_ctx);
    const Tensor idx = Describe(ctx.GetInput(0));
    const bool i64 = idx.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
    if (!idx.present || (!i64 && idx.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32))
      Fail(node, "QxGather", "input 'indices' must be int32 or int64");
    Tensor w[kNumWeight];
    Derived local;
    weights.Fetch(ctx, fmt, node, "QxGather", w, &local);
    const Derived& d = weights.all_constant ? weights.derived : local;
    const WeightView view = MakeView(fmt, w, d);

    const int64_t count = idx.count();
    std::vector<int64_t> rows(static_cast<size_t>(count));
    for (int64_t i = 0; i < count; ++i) {
      int64_t r = i64 ? static_cast<const int64_t*>(idx.data)[i]
                      : static_cast<const int32_t*>(idx.data)[i];
      if (r < -fmt.N || r >= fmt.N)
        Fail(node, "QxGather", "index " + std::to_string(r) + " out of range [" +
                                   std::to_string(-fmt.N) + ", " + std::to_string(fmt.N) + ")");
      rows[i] = r < 0 ? r + fmt.N : r;
    }
    std::vector<int64_t> out_shape = idx.shape;
    out_shape.push_back(fmt.K);
    Ort::UnownedValue y = ctx.GetOutput(0, out_shape.data(), out_shape.size());
    std::vector<float> row(static_cast<size_t>(fmt.K));
    for (int64_t i = 0; i < count; ++i) {
      DequantColumn(view, rows[i], row.data());
      if (rotate) {  // back from the rotated basis: row @ Q^T
        HadamardTransform(row.data(), fmt.K, /*transposed=*/true);
        for (int64_t k = 0; k < fmt.K; ++k) row[k] *= rotate_signs[k];
      }
      if (!d.input_scale.empty())  // the weight is diag(input_scale) @ W: row n is s * W[:, n]
        for (int64_t k = 0; k < fmt.K; ++k) row[k] *= d.input_scale[k];
      if (out_type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
        std::memcpy(y.GetTensorMutableData<float>() + i * fmt.K, row.data(), fmt.K * sizeof(float));
      } else {
        uint16_t* out = static_cast<uint16_t*>(y.GetTensorMutableRawData()) + i * fmt.K;
        for (int64_t k = 0; k < fmt.K; ++k) out[k] = FloatToHalf(row[k]);
      }
    }
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* ctx) const {
    return Guard([&] { Compute(ctx); });
  }
};

// ---------------------------------------------------------------------------------------------
// Op schemas.
OrtStatusPtr InferMatMulShape(const OrtCustomOp*, OrtShapeInferContext* ctx);
OrtStatusPtr InferGatherShape(const OrtCustomOp*, OrtShapeInferContext* ctx);
OrtStatusPtr InferMultiShape(const OrtCustomOp*, OrtShapeInferContext* ctx);

template <typename Kernel>
struct OpBase : Ort::CustomOpBase<OpBase<Kernel>, Kernel, true> {
  const char* name;
  size_t n_inputs, n_outputs, required_outputs;
  OpBase(const char* op_name, size_t inputs,
         OrtStatusPtr (*infer)(const OrtCustomOp*, OrtShapeInferContext*), size_t outputs = 1,
         size_t required = 1)
      : name(op_name), n_inputs(inputs), n_outputs(outputs), required_outputs(required) {
    this->InferOutputShapeFn = infer;
  }
  const char* GetName() const { return name; }
  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const {
    return Guard([&] { *kernel = new Kernel(info); });
  }
  size_t GetInputTypeCount() const { return n_inputs; }
  ONNXTensorElementDataType GetInputType(size_t) const {
    return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    // input 0 (A / indices), B and scales (of the first weight) are required; the rest optional
    return i <= 2 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  }
  size_t GetOutputTypeCount() const { return n_outputs; }
  OrtCustomOpInputOutputCharacteristic GetOutputCharacteristic(size_t i) const {
    return i < required_outputs ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  }
  ONNXTensorElementDataType GetOutputType(size_t) const {
    return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  }
};

// Output = input 0's shape with its last dim replaced by N (QxMatMul; QxMultiMatMul: output i
// by N[i]) or K appended (QxGather).
enum class ShapeRule { kMatMul, kGather, kMulti };
OrtStatusPtr InferShape(OrtShapeInferContext* ctx, ShapeRule rule) {
  return Guard([&] {
    // The context owns `in`: read it through the C API, never release it.
    OrtTensorTypeAndShapeInfo* in = nullptr;
    Ort::ThrowOnError(g_api->ShapeInferContext_GetInputTypeShape(ctx, 0, &in));
    size_t rank = 0;
    Ort::ThrowOnError(g_api->GetDimensionsCount(in, &rank));
    std::vector<int64_t> dims(rank);
    std::vector<const char*> sym(rank, nullptr);
    if (rank) {
      Ort::ThrowOnError(g_api->GetDimensions(in, dims.data(), rank));
      Ort::ThrowOnError(g_api->GetSymbolicDimensions(in, sym.data(), rank));
    }
    ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
    Ort::ThrowOnError(g_api->GetTensorElementType(in, &type));
    auto attr_int = [&](const char* name, int64_t dflt) {
      const OrtOpAttr* attr = nullptr;
      OrtStatus* st = g_api->ShapeInferContext_GetAttribute(ctx, name, &attr);
      if (st || !attr) {
        if (st) g_api->ReleaseStatus(st);
        return dflt;
      }
      int64_t v = dflt;
      size_t size = 0;
      st = g_api->ReadOpAttr(attr, ORT_OP_ATTR_INT, &v, sizeof v, &size);
      if (st) {
        g_api->ReleaseStatus(st);
        return dflt;
      }
      return v;
    };
    auto attr_ints = [&](const char* name) {
      std::vector<int64_t> v(kMaxFused);
      const OrtOpAttr* attr = nullptr;
      OrtStatus* st = g_api->ShapeInferContext_GetAttribute(ctx, name, &attr);
      size_t size = 0;
      if (!st && attr)
        st = g_api->ReadOpAttr(attr, ORT_OP_ATTR_INTS, v.data(), v.size() * sizeof v[0], &size);
      if (st || !attr) {  // absent or too long: the kernel's creation names the problem
        if (st) g_api->ReleaseStatus(st);
        return std::vector<int64_t>{};
      }
      v.resize(size / sizeof v[0]);
      return v;
    };
    // the last dim of each output: K appended (gather), or N (one output) / N[i] replacing A's
    std::vector<int64_t> lasts;
    if (rule == ShapeRule::kGather) {
      dims.push_back(attr_int("K", -1));
      sym.push_back("");
      type = static_cast<ONNXTensorElementDataType>(attr_int("dtype", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT));
      lasts.push_back(dims.back());
    } else if (rule == ShapeRule::kMatMul) {
      lasts.push_back(attr_int("N", -1));
    } else {
      lasts = attr_ints("N");
      if (lasts.size() < 2)  // the outputs past N's length would have no type
        throw OpError{"QxMultiMatMul: attribute 'N' must list 2 to " + std::to_string(kMaxFused) +
                      " weights, got " + std::to_string(lasts.size())};
    }
    for (size_t o = 0; o < lasts.size(); ++o) {
      if (!dims.empty()) {
        dims.back() = lasts[o];
        sym.back() = "";
      }
      OrtTensorTypeAndShapeInfo* out = nullptr;
      Ort::ThrowOnError(g_api->CreateTensorTypeAndShapeInfo(&out));
      Ort::TensorTypeAndShapeInfo holder(out);
      Ort::ThrowOnError(g_api->SetTensorElementType(out, type));
      Ort::ThrowOnError(g_api->SetDimensions(out, dims.data(), dims.size()));
      // An unknown dim must carry a name: ORT would store a nameless -1 as a literal -1, which
      // later shape arithmetic (Shape -> Concat -> Reshape) mistakes for a real value. Each gets
      // a fresh name, so no two unknown dims are claimed equal.
      static std::atomic<uint64_t> fresh{0};
      std::vector<std::string> names(dims.size());
      std::vector<const char*> out_sym = sym;
      for (size_t i = 0; i < dims.size(); ++i) {
        if (out_sym[i] && *out_sym[i]) continue;
        if (dims[i] < 0) names[i] = "quantx_unk_" + std::to_string(fresh.fetch_add(1));
        out_sym[i] = names[i].c_str();
      }
      Ort::ThrowOnError(g_api->SetSymbolicDimensions(out, out_sym.data(), out_sym.size()));
      Ort::ThrowOnError(g_api->ShapeInferContext_SetOutputTypeShape(ctx, o, out));
    }
  });
}

OrtStatusPtr InferMatMulShape(const OrtCustomOp*, OrtShapeInferContext* ctx) {
  return InferShape(ctx, ShapeRule::kMatMul);
}
OrtStatusPtr InferGatherShape(const OrtCustomOp*, OrtShapeInferContext* ctx) {
  return InferShape(ctx, ShapeRule::kGather);
}
OrtStatusPtr InferMultiShape(const OrtCustomOp*, OrtShapeInferContext* ctx) {
  return InferShape(ctx, ShapeRule::kMulti);
}

struct Ops {
  OpBase<MatMulKernel> matmul{"QxMatMul", 1 + kNumWeight + 1, InferMatMulShape};
  OpBase<GatherKernel> gather{"QxGather", 1 + kNumWeight, InferGatherShape};
  OpBase<MultiMatMulKernel> multi{"QxMultiMatMul", 1 + kMaxFused * kFusedSlots, InferMultiShape,
                                  kMaxFused, 2};
};

Ops& GetOps() {
  static Ops ops;
  return ops;
}

}  // namespace
}  // namespace quantx

extern "C" {

// The registration itself: shared by the dlopen entry below and the static library
// (quantx_ops_static, public declaration in quantx/quantx_ops.h).
QX_OPS_EXPORT OrtStatus* ORT_API_CALL QuantxRegisterCustomOps(OrtSessionOptions* options,
                                                              const OrtApiBase* api_base) {
  using namespace quantx;
  const OrtApi* api = api_base ? api_base->GetApi(kMinOrtApi) : nullptr;
  if (!api) {
    // The runtime is older than API 17: use the always-present version 1 to say so.
    const OrtApi* v1 = api_base ? api_base->GetApi(1) : nullptr;
    return v1 ? v1->CreateStatus(ORT_FAIL, "quantx: ONNX Runtime >= 1.17 is required") : nullptr;
  }
  g_api = api;
#ifdef QUANTX_OPS_STATIC
  // Linked into the program, the C++ API's global is the program's own (one template static
  // member), set at start-up to the same runtime: only fill it when the program left it empty.
  if (!Ort::Global<void>::api_) Ort::InitApi(api);
#else
  Ort::InitApi(api);
#endif
  return Guard([&] {
    std::string why;
    if (!SelectKernels(&why)) throw OpError{"quantx: " + why};
    static std::mutex mu;
    std::lock_guard<std::mutex> lock(mu);
    Ops& ops = GetOps();
    OrtCustomOpDomain* domain = nullptr;
    Ort::ThrowOnError(api->CreateCustomOpDomain(kDomain, &domain));
    Ort::ThrowOnError(api->CustomOpDomain_Add(domain, &ops.matmul));
    Ort::ThrowOnError(api->CustomOpDomain_Add(domain, &ops.gather));
    Ort::ThrowOnError(api->CustomOpDomain_Add(domain, &ops.multi));
    Ort::ThrowOnError(api->CustomOpDomain_Add(domain, AttentionCustomOp()));
    // The session options keep the domain; it must outlive every session that uses it, so it is
    // deliberately not released.
    Ort::ThrowOnError(api->AddCustomOpDomain(options, domain));
  });
}

#ifndef QUANTX_OPS_STATIC
// Entry point ONNX Runtime calls after SessionOptions.register_custom_ops_library(path). Only the
// shared library has it: in a static link it could clash with another op library's.
__attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  return QuantxRegisterCustomOps(options, api_base);
}
#endif

// Name of the kernel table this process uses (for diagnostics and benchmarks).
QX_OPS_EXPORT const char* QuantxKernelName() {
  std::string why;
  const quantx::KernelTable* t = quantx::SelectKernels(&why);
  return t ? t->name : "none";
}

}  // extern "C"
