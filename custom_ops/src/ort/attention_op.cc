// QxGroupQueryAttention: com.microsoft GroupQueryAttention's inputs, outputs and attributes,
// which the attention rule (passes/qx_attention_rule.py) writes for native targets.
//
// A one-token step whose KV cache is shared between past and present (the present outputs are
// the past buffers: onnxruntime-genai's past_present_share_buffer, llm.KVCache) runs the kernel
// table's attend_decode, one task per (batch row, KV head). Every other call (prompts and
// chunks, copied caches, options the kernel lacks, instruction sets without it) is
// handed to ONNX Runtime's own GroupQueryAttention through CreateOp/InvokeOp, so its results
// there are ONNX Runtime's, bit for bit. Attention is the part of a decode step that grows with
// the context: at 1000 positions on SmolLM2 it took as long as all the matmuls with ONNX
// Runtime's kernel, and this one takes half that (docs/PERF.md).
#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "ort_common.h"
#include "quantx/dispatch.h"
#include "quantx/kernels.h"

namespace quantx {
namespace {

constexpr const char* kOp = "QxGroupQueryAttention";

// Inputs by position (com.microsoft GroupQueryAttention, ONNX Runtime 1.32).
enum Input {
  kQuery = 0,
  kKey,
  kValue,
  kPastKey,
  kPastValue,
  kSeqlensK,
  kTotalLength,
  kCosCache,
  kSinCache,
  kPositionIds,
  kAttentionBias,
  kHeadSink,  // 11..15: none of them on the decode kernel's path
  kQueryLengths = 16,
  kNumInputs
};
constexpr size_t kNumOutputs = 3;  // output, present_key, present_value (no output_qk)

// GroupQueryAttention attributes this op does not forward: a node with one is refused, since
// the delegated op would silently run without it.
const char* const kUnsupportedAttrs[] = {
    "qk_output",      "kv_cache_bit_width", "causal",          "sliding_window_cache",
    "q_norm_epsilon", "k_norm_epsilon",     "qk_norm_epsilon", "k_quant_type",
    "v_quant_type"};

bool HasStringAttr(const Ort::ConstKernelInfo& info, const char* name) {
  size_t size = 0;
  OrtStatus* st = g_api->KernelInfoGetAttribute_string(info, name, nullptr, &size);
  if (!st) return true;
  g_api->ReleaseStatus(st);
  return false;
}

bool FloatAttr(const Ort::ConstKernelInfo& info, const char* name, float* out) {
  OrtStatus* st = g_api->KernelInfoGetAttribute_float(info, name, out);
  if (!st) return true;
  g_api->ReleaseStatus(st);
  return false;
}

bool IntAttrIfAny(const Ort::ConstKernelInfo& info, const char* name, int64_t* out) {
  OrtStatus* st = g_api->KernelInfoGetAttribute_int64(info, name, out);
  if (!st) return true;
  g_api->ReleaseStatus(st);
  return false;
}

// Positions of one row's cache from which the decode kernel's tasks (one per row and KV head)
// run on the thread pool: below, a task costs less than handing it to another thread. In a
// decode step the pool's threads are awake (they just ran a matmul), so the hand-off is cheap:
// on SmolLM2 with 2 threads (3 KV heads), steps at depths 128-160 were 4-8% faster threaded
// from 64 positions than from 256, at 100 about 2%, at 16-40 within +-2% (docs/PERF.md).
constexpr int64_t kParallelMinLength = 64;

struct AttentionKernel {
  std::string node;
  int64_t heads = 0, kv_heads = 0;
  float scale = 0.0f;  // 0: 1 / sqrt(head_dim)
  bool rotary = false;
  bool own_kernel = false;  // attributes the decode kernel implements
  const KernelTable* kernels = nullptr;
  size_t n_inputs = 0;
  Ort::Op ort_op{nullptr};

  AttentionKernel(const OrtKernelInfo* raw_info) {
    Ort::ConstKernelInfo info(raw_info);
    node = NodeName(info);
    for (const char* name : kUnsupportedAttrs)
      if (HasAttr(info, name, true) || HasStringAttr(info, name))
        Fail(node, kOp,
             std::string("attribute '") + name +
                 "' is not supported (use com.microsoft GroupQueryAttention)");
    heads = IntAttr(info, "num_heads", true, 0, node, kOp);
    kv_heads = IntAttr(info, "kv_num_heads", true, 0, node, kOp);
    if (heads <= 0 || kv_heads <= 0 || heads % kv_heads)
      Fail(node, kOp, "num_heads must be a positive multiple of kv_num_heads");

    // Everything the node says is forwarded to ONNX Runtime's op.
    std::vector<Ort::OpAttr> attrs;
    int64_t ints[6] = {heads, kv_heads, 0, 0, -1, 0};
    const char* int_names[] = {"num_heads",          "kv_num_heads",      "do_rotary",
                               "rotary_interleaved", "local_window_size", "smooth_softmax"};
    for (int i = 0; i < 6; ++i)
      if (i < 2 || IntAttrIfAny(info, int_names[i], &ints[i]))
        attrs.emplace_back(int_names[i], &ints[i], 1, OrtOpAttrType::ORT_OP_ATTR_INT);
    float softcap = 0.0f;
    if (FloatAttr(info, "scale", &scale))
      attrs.emplace_back("scale", &scale, 1, OrtOpAttrType::ORT_OP_ATTR_FLOAT);
    if (FloatAttr(info, "softcap", &softcap))
      attrs.emplace_back("softcap", &softcap, 1, OrtOpAttrType::ORT_OP_ATTR_FLOAT);
    rotary = ints[2] == 1;
    own_kernel = (ints[2] == 0 || ints[2] == 1) && ints[3] == 0 && ints[4] == -1 && ints[5] == 0 &&
                 softcap == 0.0f;

    n_inputs = info.GetInputCount();
    if (n_inputs > kNumInputs) Fail(node, kOp, "more inputs than GroupQueryAttention has");
    const char* type_names[] = {"T", "M"};
    ONNXTensorElementDataType types[] = {ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
                                         ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32};
    std::vector<const OrtOpAttr*> raw_attrs;
    for (auto& a : attrs) raw_attrs.push_back(a);
    OrtOp* op = nullptr;
    try {
      Ort::ThrowOnError(g_api->CreateOp(raw_info, "GroupQueryAttention", "com.microsoft", 1,
                                        type_names, types, 2, raw_attrs.data(),
                                        static_cast<int>(raw_attrs.size()),
                                        static_cast<int>(n_inputs), kNumOutputs, &op));
    } catch (const Ort::Exception& e) {
      Fail(node, kOp,
           std::string("this ONNX Runtime's GroupQueryAttention, which runs every call but "
                       "one-token decode steps, cannot take the node: ") +
               e.what());
    }
    ort_op = Ort::Op(op);
    std::string why;
    kernels = SelectKernels(&why);
    if (!kernels) Fail(node, kOp, why);
  }

  void Compute(OrtKernelContext* raw_ctx) const {
    Ort::KernelContext ctx(raw_ctx);
    Tensor in[kNumInputs];  // absent beyond the node's inputs
    for (size_t i = 0; i < n_inputs; ++i) in[i] = Describe(ctx.GetInput(i));
    const Tensor &q = in[kQuery], &k = in[kKey], &past_k = in[kPastKey], &past_v = in[kPastValue],
                 &total = in[kTotalLength];
    // The output shapes as GroupQueryAttention computes them; checked first, since the
    // delegated op writes into the outputs allocated here.
    if (q.shape.size() != 3 || k.shape.size() != 3 || k.shape[0] != q.shape[0] ||
        k.shape[1] != q.shape[1])
      Fail(node, kOp,
           "inputs 'query' and 'key' must be [batch, sequence, hidden] with equal batch and "
           "sequence, got " +
               ShapeStr(q.shape) + " and " + ShapeStr(k.shape));
    const int64_t B = q.shape[0], S = q.shape[1];
    if (q.shape[2] % heads || k.shape[2] % kv_heads)
      Fail(node, kOp, "hidden sizes of 'query' and 'key' must divide by the head counts");
    const int64_t D = q.shape[2] / heads;
    const std::vector<int64_t> cache_shape = {B, kv_heads,
                                              past_k.shape.size() == 4 ? past_k.shape[2] : -1, D};
    if (past_k.shape != cache_shape || past_v.shape != cache_shape || k.shape[2] != kv_heads * D)
      Fail(node, kOp,
           "'past_key' and 'past_value' must be [batch, kv_num_heads, positions, head_size] = " +
               ShapeStr(cache_shape) + ", got " + ShapeStr(past_k.shape) + " and " +
               ShapeStr(past_v.shape));
    if (total.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32 || total.count() != 1)
      Fail(node, kOp, "input 'total_sequence_length' must be one int32");
    const int64_t total_len = *static_cast<const int32_t*>(total.data);
    std::vector<int64_t> present_shape = cache_shape;
    present_shape[2] = std::max<int64_t>(cache_shape[2], total_len);
    Ort::UnownedValue out = ctx.GetOutput(0, q.shape);
    Ort::UnownedValue present_k = ctx.GetOutput(1, present_shape);
    Ort::UnownedValue present_v = ctx.GetOutput(2, present_shape);
    const bool shared =
        present_k.GetTensorRawData() == past_k.data && present_v.GetTensorRawData() == past_v.data;
    if (shared && S == 1 && DecodeStep(in, raw_ctx, B, D, cache_shape[2], total_len, out)) return;
    std::vector<const OrtValue*> inputs(n_inputs, nullptr);
    for (size_t i = 0; i < n_inputs; ++i) inputs[i] = ctx.GetInput(i);
    OrtValue* outputs[kNumOutputs] = {out, present_k, present_v};
    Ort::ThrowOnError(g_api->InvokeOp(raw_ctx, ort_op, inputs.data(), static_cast<int>(n_inputs),
                                      outputs, kNumOutputs));
  }

  // The decode kernel on one token per row, appending in place to caches of `capacity`
  // positions. False where the step is not one it implements (ONNX Runtime's op runs it).
  bool DecodeStep(const Tensor (&in)[kNumInputs], OrtKernelContext* raw_ctx, int64_t B, int64_t D,
                  int64_t capacity, int64_t total_len, Ort::UnownedValue& out) const {
    if (!own_kernel || !kernels->attend_decode || D % 2) return false;
    const Tensor &q = in[kQuery], &k = in[kKey], &v = in[kValue], &past_k = in[kPastKey],
                 &past_v = in[kPastValue], &seqlens = in[kSeqlensK], &cos = in[kCosCache],
                 &sin = in[kSinCache], &pos = in[kPositionIds], &bias = in[kAttentionBias],
                 &query_lengths = in[kQueryLengths];
    constexpr auto kF32 = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    if (q.type != kF32 || k.type != kF32 || v.type != kF32 || v.shape != k.shape ||
        past_k.type != kF32)
      return false;
    for (size_t i = kHeadSink; i < kQueryLengths; ++i)
      if (in[i].present) return false;
    if (query_lengths.present) {
      if (query_lengths.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32 || query_lengths.count() != B)
        return false;
      const int32_t* n = static_cast<const int32_t*>(query_lengths.data);
      if (!std::all_of(n, n + B, [](int32_t x) { return x == 1; })) return false;
    }
    const int64_t half = D / 2;
    if (rotary && (!cos.present || !sin.present || cos.type != kF32 || sin.type != kF32 ||
                   cos.shape.size() != 2 || cos.shape[1] != half || sin.shape != cos.shape))
      return false;
    if (pos.present && (pos.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 || pos.count() != B))
      return false;
    int64_t bias_rows = 0, bias_len = 0;
    if (bias.present) {
      if (bias.type != kF32 || bias.shape.size() != 4 || bias.shape[1] != 1 || bias.shape[2] != 1 ||
          (bias.shape[0] != 1 && bias.shape[0] != B))
        return false;
      bias_rows = bias.shape[0];
      bias_len = bias.shape[3];
    }
    if (seqlens.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32 || seqlens.count() != B)
      Fail(node, kOp, "input 'seqlens_k' must be int32 [batch]");
    if (bias.present && bias_len != total_len)
      Fail(node, kOp, "'attention_bias' must have total_sequence_length positions");

    // Each row's valid length after the append, and its rotary position.
    const int32_t* lens = static_cast<const int32_t*>(seqlens.data);
    std::vector<int64_t> length(B), position(B);
    int64_t longest = 0;
    for (int64_t b = 0; b < B; ++b) {
      length[b] = int64_t{lens[b]} + 1;
      if (length[b] < 1 || length[b] > capacity || length[b] > total_len)
        Fail(node, kOp,
             "seqlens_k[" + std::to_string(b) + "] = " + std::to_string(lens[b]) +
                 " is outside the cache of " + std::to_string(capacity) +
                 " positions (total_sequence_length " + std::to_string(total_len) + ")");
      position[b] = pos.present ? static_cast<const int64_t*>(pos.data)[b] : length[b] - 1;
      if (rotary && (position[b] < 0 || position[b] >= cos.shape[0]))
        Fail(node, kOp,
             "position " + std::to_string(position[b]) + " is outside the rotary caches of " +
                 std::to_string(cos.shape[0]) + " positions");
      longest = std::max(longest, length[b]);
    }

    const int64_t group = heads / kv_heads, per_task = group * (longest + D);
    std::vector<float> scratch(static_cast<size_t>(B * kv_heads * per_task));
    const float* qf = static_cast<const float*>(q.data);
    const float* kf = static_cast<const float*>(k.data);
    const float* vf = static_cast<const float*>(v.data);
    float* k_cache = static_cast<float*>(const_cast<void*>(past_k.data));
    float* v_cache = static_cast<float*>(const_cast<void*>(past_v.data));
    float* y = out.GetTensorMutableData<float>();
    const float s = scale != 0.0f ? scale : 1.0f / std::sqrt(static_cast<float>(D));
    auto task = [&](int64_t i) {
      const int64_t b = i / kv_heads, g = i % kv_heads;
      DecodeAttentionArgs a;
      a.head_dim = D;
      a.group = group;
      a.length = length[b];
      a.q = qf + (b * heads + g * group) * D;
      a.k_new = kf + (b * kv_heads + g) * D;
      a.v_new = vf + (b * kv_heads + g) * D;
      a.k_cache = k_cache + (b * kv_heads + g) * capacity * D;
      a.v_cache = v_cache + (b * kv_heads + g) * capacity * D;
      if (rotary) {
        a.cos = static_cast<const float*>(cos.data) + position[b] * half;
        a.sin = static_cast<const float*>(sin.data) + position[b] * half;
      }
      if (bias.present)
        a.bias = static_cast<const float*>(bias.data) + (bias_rows > 1 ? b : 0) * bias_len;
      a.scale = s;
      a.out = y + (b * heads + g * group) * D;
      a.scratch = scratch.data() + i * per_task;
      kernels->attend_decode(a);
    };
    const int64_t n_tasks = B * kv_heads;
    if (longest >= kParallelMinLength && n_tasks > 1) {
      OrtParallelFor(raw_ctx)(n_tasks, task);
    } else {
      for (int64_t i = 0; i < n_tasks; ++i) task(i);
    }
    return true;
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* ctx) const {
    return Guard([&] { Compute(ctx); });
  }
};

// Output 0 has the query's type and shape; the presents' lengths depend on the inputs' values.
OrtStatusPtr InferAttentionShape(const OrtCustomOp*, OrtShapeInferContext* ctx) {
  return Guard([&] {
    OrtTensorTypeAndShapeInfo* query = nullptr;  // owned by the context
    Ort::ThrowOnError(g_api->ShapeInferContext_GetInputTypeShape(ctx, kQuery, &query));
    size_t rank = 0;
    Ort::ThrowOnError(g_api->GetDimensionsCount(query, &rank));
    if (rank == 3)  // else unknown (a rank of 0 may mean no shape at all): left to run time
      Ort::ThrowOnError(g_api->ShapeInferContext_SetOutputTypeShape(ctx, 0, query));
  });
}

struct AttentionOp : Ort::CustomOpBase<AttentionOp, AttentionKernel, true> {
  AttentionOp() { InferOutputShapeFn = InferAttentionShape; }
  const char* GetName() const { return kOp; }
  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const {
    return Guard([&] { *kernel = new AttentionKernel(info); });
  }
  size_t GetInputTypeCount() const { return kNumInputs; }
  // float32 only (the rewrite leaves float16 attention to ONNX Runtime); 11..15 are never set
  ONNXTensorElementDataType GetInputType(size_t i) const {
    switch (i) {
      case kSeqlensK:
      case kTotalLength:
      case kQueryLengths:
        return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;
      case kPositionIds:
        return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
      default:
        return i < kHeadSink ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT
                             : ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
    }
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    // q, k, v, the past caches and the two lengths: what the decode kernel needs at the least
    return i <= kTotalLength ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  }
  size_t GetOutputTypeCount() const { return kNumOutputs; }
  ONNXTensorElementDataType GetOutputType(size_t) const {
    return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
};

}  // namespace

OrtCustomOp* AttentionCustomOp() {
  static AttentionOp op;
  return &op;
}

}  // namespace quantx
