// Public entry of the QuantX ONNX Runtime custom ops (domain com.quantx: QxMatMul, QxGather).
//
// Two ways to make a session know the ops:
//   - dynamic: the shared library (quantx::quantx_ops) loaded by ONNX Runtime itself,
//       Ort::SessionOptions::RegisterCustomOpsLibrary(path), which calls RegisterCustomOps;
//   - static, for builds without dlopen (mobile, single binaries): link quantx::quantx_ops_static
//       and call QuantxRegisterCustomOps on the session options before creating the session.
#pragma once

#include <onnxruntime_c_api.h>

#ifdef __cplusplus
extern "C" {
#endif

// Adds the com.quantx domain to `options`. `api_base` is OrtGetApiBase() of the runtime the
// session will use (ONNX Runtime >= 1.17). Returns nullptr on success, else an OrtStatus the
// caller releases (the CPU lacking the instructions of QUANTX_ISA, a runtime too old, ...).
OrtStatus* ORT_API_CALL QuantxRegisterCustomOps(OrtSessionOptions* options,
                                                const OrtApiBase* api_base);

// Name of the kernel table this process uses: "avx512", "avx-vnni", "avx2", "neon-dotprod", "neon",
// "ref", or "none" when no table is usable.
const char* QuantxKernelName(void);

#ifdef __cplusplus
}  // extern "C"
#endif
