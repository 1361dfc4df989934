// CPU feature detection and the choice of kernel table: the one place that knows which
// instruction sets exist.
#include "quantx/dispatch.h"

#include <cstdlib>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#define QX_X86 1
#elif defined(__aarch64__)
#include <sys/auxv.h>
#define QX_ARM64 1
#endif

namespace quantx {

namespace {

#if QX_X86
uint64_t Xgetbv() {
  uint32_t eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<uint64_t>(edx) << 32) | eax;
}
#endif

CpuFeatures Detect() {
  CpuFeatures f;
#if QX_X86
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool osxsave = c & (1u << 27);
  f.fma = c & (1u << 12);
  f.f16c = c & (1u << 29);
  const uint64_t xcr0 = osxsave ? Xgetbv() : 0;
  const bool ymm_os = (xcr0 & 0x6) == 0x6;
  const bool zmm_os = (xcr0 & 0xe6) == 0xe6;
  if (__get_cpuid_max(0, nullptr) >= 7) {
    __cpuid_count(7, 0, a, b, c, d);
    f.avx2 = ymm_os && (b & (1u << 5));
    f.bmi2 = b & (1u << 8);
    f.avx512f = zmm_os && (b & (1u << 16));
    f.avx512bw = f.avx512f && (b & (1u << 30));
    f.avx512vl = f.avx512f && (b & (1u << 31));
    f.avx512vbmi = f.avx512f && (c & (1u << 1));
    f.avx512vnni = f.avx512f && (c & (1u << 11));
    __cpuid_count(7, 1, a, b, c, d);
    f.avx_vnni = ymm_os && (a & (1u << 4));
  }
  f.fma = f.fma && ymm_os;
  f.f16c = f.f16c && ymm_os;
#elif QX_ARM64
  f.neon = true;
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)
#endif
  f.dotprod = getauxval(AT_HWCAP) & HWCAP_ASIMDDP;
#endif
  return f;
}

struct Candidate {
  const char* name;
  const KernelTable* (*table)();
  bool (*supported)(const CpuFeatures&);
};

// Worst to best; SelectKernels takes the last usable one.
const Candidate kCandidates[] = {
    {"ref", RefKernels, [](const CpuFeatures&) { return true; }},
    {"neon", NeonKernels, [](const CpuFeatures& f) { return f.neon; }},
    {"neon-dotprod", NeonDotKernels, [](const CpuFeatures& f) { return f.neon && f.dotprod; }},
    {"avx2", Avx2Kernels,
     [](const CpuFeatures& f) { return f.avx2 && f.fma && f.f16c && f.bmi2; }},
    {"avx-vnni", AvxVnniKernels,
     [](const CpuFeatures& f) {
#ifdef QX_AVXVNNI_EVEX  // test build: the avx-vnni code EVEX-encoded, for AVX-512 VNNI CPUs
       return f.avx2 && f.fma && f.f16c && f.bmi2 && f.avx512vl && f.avx512vnni;
#else
       return f.avx2 && f.fma && f.f16c && f.bmi2 && f.avx_vnni;
#endif
     }},
    {"avx512", Avx512Kernels,
     [](const CpuFeatures& f) {
       return f.avx512f && f.avx512bw && f.avx512vl && f.avx512vnni && f.fma && f.f16c && f.bmi2;
     }},
};

}  // namespace

const CpuFeatures& DetectCpu() {
  static const CpuFeatures features = Detect();
  return features;
}

const KernelTable* KernelsByName(const std::string& name, std::string* why) {
  for (const Candidate& c : kCandidates) {
    if (name != c.name) continue;
    const KernelTable* t = c.table();
    if (!t) {
      if (why) *why = "kernels '" + name + "' are not compiled into this build";
      return nullptr;
    }
    if (!c.supported(DetectCpu())) {
      if (why) *why = "this CPU lacks the instructions of kernels '" + name + "'";
      return nullptr;
    }
    return t;
  }
  if (why)
    *why = "unknown kernel set '" + name +
           "' (known: ref, avx2, avx-vnni, avx512, neon, neon-dotprod)";
  return nullptr;
}

const KernelTable* SelectKernels(std::string* why) {
  const char* env = std::getenv("QUANTX_ISA");
  if (env && *env) {
    std::string reason;
    const KernelTable* t = KernelsByName(env, &reason);
    if (!t && why) *why = "QUANTX_ISA=" + std::string(env) + ": " + reason;
    return t;
  }
  const KernelTable* best = RefKernels();
  for (const Candidate& c : kCandidates)
    if (c.table() && c.supported(DetectCpu())) best = c.table();
  return best;
}

std::string AvailableKernels() {
  std::string out;
  for (const Candidate& c : kCandidates) {
    if (!c.table() || !c.supported(DetectCpu())) continue;
    if (!out.empty()) out += ",";
    out += c.name;
  }
  return out;
}

}  // namespace quantx
