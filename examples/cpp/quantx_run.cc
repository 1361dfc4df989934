// quantx_run: runs a QuantX ONNX model with ONNX Runtime's C++ API.
//
//   quantx_run [--library libquantx_ops.so] [--threads N] model.onnx inputs.qxt outputs.qxt
//
// inputs.qxt holds the feeds, outputs.qxt receives every model output. Tensor file (.qxt),
// little endian:
//   "QXT1"  uint32 count
//   count x { uint32 name_len, name bytes, int32 ONNX element type (1 float, 7 int64, ...),
//             uint32 rank, int64 dims[rank], raw data }
// tests/test_native.py reads and writes it with numpy.
#include <onnxruntime_cxx_api.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <stdexcept>
#include <string>
#include <vector>

#ifdef QUANTX_STATIC
#include <quantx/quantx_ops.h>
#endif

namespace {

struct Tensor {
  std::string name;
  ONNXTensorElementDataType type;
  std::vector<int64_t> dims;
  std::vector<char> data;
};

size_t ElementSize(ONNXTensorElementDataType t) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT:
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32:
      return 4;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64:
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE:
      return 8;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16:
      return 2;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL:
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8:
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8:
      return 1;
    default:
      throw std::runtime_error("unsupported element type " + std::to_string(t));
  }
}

size_t Count(const std::vector<int64_t>& dims) {
  size_t n = 1;
  for (int64_t d : dims) n *= static_cast<size_t>(d);
  return n;
}

template <typename T>
T Read(std::ifstream& f) {
  T v{};
  if (!f.read(reinterpret_cast<char*>(&v), sizeof v)) throw std::runtime_error("truncated file");
  return v;
}

std::vector<Tensor> ReadTensors(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot open " + path);
  char magic[4];
  if (!f.read(magic, 4) || std::memcmp(magic, "QXT1", 4) != 0)
    throw std::runtime_error(path + ": not a QXT1 tensor file");
  std::vector<Tensor> out(Read<uint32_t>(f));
  for (Tensor& t : out) {
    t.name.resize(Read<uint32_t>(f));
    f.read(&t.name[0], t.name.size());
    t.type = static_cast<ONNXTensorElementDataType>(Read<int32_t>(f));
    t.dims.resize(Read<uint32_t>(f));
    for (int64_t& d : t.dims) d = Read<int64_t>(f);
    t.data.resize(Count(t.dims) * ElementSize(t.type));
    if (!f.read(t.data.data(), t.data.size())) throw std::runtime_error(path + ": truncated");
  }
  return out;
}

template <typename T>
void Write(std::ofstream& f, T v) {
  f.write(reinterpret_cast<const char*>(&v), sizeof v);
}

void WriteTensors(const std::string& path, const std::vector<Tensor>& tensors) {
  std::ofstream f(path, std::ios::binary);
  f.write("QXT1", 4);
  Write<uint32_t>(f, tensors.size());
  for (const Tensor& t : tensors) {
    Write<uint32_t>(f, t.name.size());
    f.write(t.name.data(), t.name.size());
    Write<int32_t>(f, t.type);
    Write<uint32_t>(f, t.dims.size());
    for (int64_t d : t.dims) Write<int64_t>(f, d);
    f.write(t.data.data(), t.data.size());
  }
  if (!f) throw std::runtime_error("cannot write " + path);
}

int Usage() {
  std::fprintf(stderr,
               "usage: quantx_run [--library libquantx_ops.so] [--threads N] model.onnx "
               "inputs.qxt outputs.qxt\n");
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
#ifndef QUANTX_STATIC
  std::string library = QUANTX_OPS_LIBRARY;  // the installed path, from the package config
#endif
  int threads = 1;
  std::vector<std::string> args;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--library" && i + 1 < argc) {
#ifndef QUANTX_STATIC
      library = argv[++i];
#else
      ++i;  // linked in: nothing to load
#endif
    } else if (a == "--threads" && i + 1 < argc) {
      threads = std::atoi(argv[++i]);
    } else {
      args.push_back(a);
    }
  }
  if (args.size() != 3) return Usage();

  try {
    Ort::Env env(ORT_LOGGING_LEVEL_WARNING, "quantx_run");
    Ort::SessionOptions options;
    options.SetIntraOpNumThreads(threads);
#ifdef QUANTX_STATIC
    // No dlopen: the ops are in this binary.
    Ort::ThrowOnError(QuantxRegisterCustomOps(options, OrtGetApiBase()));
    std::printf("quantx: static registration, kernels %s\n", QuantxKernelName());
#else
    options.RegisterCustomOpsLibrary(library.c_str());
    std::printf("quantx: loaded %s\n", library.c_str());
#endif
    Ort::Session session(env, args[0].c_str(), options);

    std::vector<Tensor> inputs = ReadTensors(args[1]);
    Ort::AllocatorWithDefaultOptions allocator;
    std::vector<Ort::Value> feeds;
    std::vector<const char*> input_names;
    for (const Tensor& t : inputs) {
      feeds.push_back(Ort::Value::CreateTensor(allocator, t.dims.data(), t.dims.size(), t.type));
      if (!t.data.empty())
        std::memcpy(feeds.back().GetTensorMutableRawData(), t.data.data(), t.data.size());
      input_names.push_back(t.name.c_str());
    }
    std::vector<std::string> output_names;
    for (size_t i = 0; i < session.GetOutputCount(); ++i)
      output_names.push_back(session.GetOutputNameAllocated(i, allocator).get());
    std::vector<const char*> output_ptrs;
    for (const std::string& n : output_names) output_ptrs.push_back(n.c_str());

    std::vector<Ort::Value> results =
        session.Run(Ort::RunOptions{nullptr}, input_names.data(), feeds.data(), feeds.size(),
                    output_ptrs.data(), output_ptrs.size());

    std::vector<Tensor> outputs;
    for (size_t i = 0; i < results.size(); ++i) {
      Ort::TensorTypeAndShapeInfo info = results[i].GetTensorTypeAndShapeInfo();
      Tensor t{output_names[i], info.GetElementType(), info.GetShape(), {}};
      t.data.resize(Count(t.dims) * ElementSize(t.type));
      if (!t.data.empty()) std::memcpy(t.data.data(), results[i].GetTensorRawData(), t.data.size());
      std::printf("%s: [", t.name.c_str());
      for (size_t d = 0; d < t.dims.size(); ++d)
        std::printf("%s%lld", d ? ", " : "", static_cast<long long>(t.dims[d]));
      std::printf("]\n");
      outputs.push_back(std::move(t));
    }
    WriteTensors(args[2], outputs);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "quantx_run: %s\n", e.what());
    return 1;
  }
  return 0;
}
