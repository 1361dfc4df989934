// Run-time choice of the kernel table: CPU feature detection, overridable by QUANTX_ISA.
#pragma once

#include <string>

#include "quantx/kernels.h"

namespace quantx {

struct CpuFeatures {
  bool avx2 = false, fma = false, f16c = false, bmi2 = false, avx_vnni = false;
  bool avx512f = false, avx512bw = false, avx512vl = false, avx512vnni = false,
       avx512vbmi = false;
  bool neon = false, dotprod = false;
};
const CpuFeatures& DetectCpu();

// Kernel table by name ("ref", "avx2", "avx-vnni", "avx512", "neon", "neon-dotprod") if compiled in
// and supported by this CPU; nullptr otherwise (with the reason in *why).
const KernelTable* KernelsByName(const std::string& name, std::string* why);

// The best table for this CPU, or the one named by the environment variable QUANTX_ISA.
// Returns nullptr (and the reason) if QUANTX_ISA names an unknown or unsupported ISA.
const KernelTable* SelectKernels(std::string* why);

// Names of the tables usable on this CPU, best last.
std::string AvailableKernels();

}  // namespace quantx
