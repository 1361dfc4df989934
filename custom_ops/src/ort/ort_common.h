// The ONNX Runtime glue shared by the op files (ort_ops.cc: QxMatMul, QxMultiMatMul, QxGather;
// attention_op.cc: QxGroupQueryAttention): the API pointer, errors that name the node, views of
// input tensors, attributes, the intra-op thread pool.
#pragma once

#include <cstring>
#include <functional>
#include <sstream>
#include <string>
#include <vector>

#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include "quantx/matmul.h"

namespace quantx {

// Oldest ORT API with everything used here (KernelContext_ParallelFor came in 1.17).
inline constexpr uint32_t kMinOrtApi = 17;
inline constexpr const char* kDomain = "com.quantx";

inline const OrtApi* g_api = nullptr;  // set by QuantxRegisterCustomOps

// Thrown by validation; turned into an ORT status at the boundary.
struct OpError {
  std::string message;
};

[[noreturn]] inline void Fail(const std::string& node, const std::string& op,
                              const std::string& what) {
  throw OpError{op + " node '" + node + "': " + what};
}

template <typename Fn>
inline OrtStatusPtr Guard(Fn&& fn) {
  try {
    fn();
    return nullptr;
  } catch (const OpError& e) {
    return g_api->CreateStatus(ORT_INVALID_ARGUMENT, e.message.c_str());
  } catch (const Ort::Exception& e) {
    return g_api->CreateStatus(e.GetOrtErrorCode(), e.what());
  } catch (const std::bad_alloc&) {
    return g_api->CreateStatus(ORT_FAIL, "quantx: out of memory");
  } catch (const std::exception& e) {
    return g_api->CreateStatus(ORT_FAIL, e.what());
  } catch (...) {
    return g_api->CreateStatus(ORT_FAIL, "quantx: unknown error");
  }
}

inline std::string ShapeStr(const std::vector<int64_t>& s) {
  std::ostringstream o;
  o << "[";
  for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
  o << "]";
  return o.str();
}

struct Tensor {
  bool present = false;
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  std::vector<int64_t> shape;
  const void* data = nullptr;
  int64_t count() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
  }
};

inline Tensor Describe(const Ort::ConstValue& v) {
  Tensor t;
  if (!v) return t;
  t.present = true;
  auto info = v.GetTensorTypeAndShapeInfo();
  t.type = info.GetElementType();
  t.shape = info.GetShape();
  t.data = v.GetTensorRawData();
  return t;
}

inline bool IsFloat(ONNXTensorElementDataType t) {
  return t == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || t == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
}

// An int attribute (dflt when absent and not required).
inline int64_t IntAttr(const Ort::ConstKernelInfo& info, const char* name, bool required,
                       int64_t dflt, const std::string& node, const std::string& op) {
  int64_t v = dflt;
  OrtStatus* st = g_api->KernelInfoGetAttribute_int64(info, name, &v);
  if (st) {
    g_api->ReleaseStatus(st);
    if (required) Fail(node, op, std::string("missing required int attribute '") + name + "'");
    return dflt;
  }
  return v;
}

// Whether the node has attribute `name` as an int or float (scalar), or as ints (ORT has no
// type-free test; reading ints succeeds on an int attribute too, with no values).
inline bool HasAttr(const Ort::ConstKernelInfo& info, const char* name, bool scalar_only) {
  int64_t i = 0;
  float f = 0.0f;
  size_t size = 0;
  for (int type = 0; type < (scalar_only ? 2 : 3); ++type) {
    OrtStatus* st = type == 0 ? g_api->KernelInfoGetAttribute_int64(info, name, &i)
                    : type == 1
                        ? g_api->KernelInfoGetAttribute_float(info, name, &f)
                        : g_api->KernelInfoGetAttributeArray_int64(info, name, nullptr, &size);
    if (!st) return true;
    g_api->ReleaseStatus(st);
  }
  return false;
}

inline std::string NodeName(const Ort::ConstKernelInfo& info) {
  try {
    return info.GetNodeName();
  } catch (...) {
    return "?";
  }
}

// ONNX Runtime's intra-op thread pool as the drivers' parallel loop.
inline ParallelFor OrtParallelFor(OrtKernelContext* raw) {
  return [raw](int64_t n, const std::function<void(int64_t)>& fn) {
    if (n == 1) {
      fn(0);
      return;
    }
    struct Call {
      const std::function<void(int64_t)>* fn;
    } call{&fn};
    auto tramp = [](void* user, size_t i) {
      (*static_cast<Call*>(user)->fn)(static_cast<int64_t>(i));
    };
    Ort::ThrowOnError(
        g_api->KernelContext_ParallelFor(raw, tramp, static_cast<size_t>(n), 0, &call));
  };
}

// QxGroupQueryAttention (attention_op.cc).
OrtCustomOp* AttentionCustomOp();

}  // namespace quantx
