// Kernel tests without ONNX Runtime: every SIMD kernel table usable on this CPU (or named on
// the command line) against the portable reference kernel, on randomized shapes and formats.
// The reference itself is checked against the numpy reference from the Python tests.
//
//   quantx_kernel_tests [--isa NAME] [--cases N] [--seed S]
// Prints one line per failure and a final "N passed, M failed"; exit code 1 on any failure.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "kernels/decode.h"
#include "quantx/dispatch.h"
#include "quantx/matmul.h"

using namespace quantx;

namespace {

struct Case {
  int64_t M, K, N;
  int bits;
  int64_t group_size;
  Layout layout;
  ComputePath path;
  bool symmetric, hierarchical, codebook, input_scale, bias, f16_scales, f16_act;
};

std::string Describe(const Case& c) {
  char buf[256];
  std::snprintf(buf, sizeof buf,
                "M=%lld K=%lld N=%lld bits=%d g=%lld layout=%d path=%d sym=%d hier=%d cb=%d "
                "in_scale=%d bias=%d f16s=%d f16a=%d",
                (long long)c.M, (long long)c.K, (long long)c.N, c.bits, (long long)c.group_size,
                (int)c.layout, (int)c.path, c.symmetric, c.hierarchical, c.codebook,
                c.input_scale, c.bias, c.f16_scales, c.f16_act);
  return buf;
}

// Random packed weight of the case's format (any byte pattern is a valid packed weight).
struct RandomWeight {
  WeightFormat f;
  std::vector<uint8_t> B, zp, sub;
  std::vector<uint16_t> scales16;
  std::vector<float> scales32, input_scale, bias;
  CodebookTables cb;
  std::vector<float> cb_raw;

  RandomWeight(const Case& c, std::mt19937& rng) {
    f.K = c.K;
    f.N = c.N;
    f.bits = c.bits;
    f.group_size = c.group_size;
    f.layout = c.layout;
    if (c.hierarchical) {
      f.scale_bits = 4;
      f.super_group = 3;
    }
    const PackedShapes s = ExpectedShapes(f);
    auto count = [](const std::vector<int64_t>& v) {
      int64_t n = 1;
      for (int64_t d : v) n *= d;
      return static_cast<size_t>(n);
    };
    std::uniform_int_distribution<int> byte(0, 255);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    B.resize(count(s.B));
    for (auto& b : B) b = static_cast<uint8_t>(byte(rng));
    const size_t n_scales = count(s.scales);
    scales32.resize(n_scales);
    for (auto& v : scales32) v = 0.01f * (0.5f + std::fabs(normal(rng))) * (c.codebook && byte(rng) < 64 ? -1.0f : 1.0f);
    scales16.resize(n_scales);
    for (size_t i = 0; i < n_scales; ++i) {
      scales16[i] = FloatToHalf(scales32[i]);
      if (c.f16_scales) scales32[i] = HalfToFloat(scales16[i]);
    }
    if (!c.symmetric && !c.codebook) {
      zp.resize(count(s.zero_points));
      for (auto& b : zp) b = static_cast<uint8_t>(byte(rng));
    }
    if (c.hierarchical) {
      sub.resize(count(s.sub_scales));
      for (auto& b : sub) b = static_cast<uint8_t>(byte(rng));
    }
    if (c.codebook) {
      const int64_t rows = byte(rng) < 128 ? 1 : c.N;
      cb_raw.resize(static_cast<size_t>(rows * f.levels()));
      for (auto& v : cb_raw) v = normal(rng);
      cb = MakeCodebookTables(cb_raw.data(), false, rows, f.levels());
    }
    if (c.input_scale) {
      input_scale.resize(static_cast<size_t>(c.K));
      for (auto& v : input_scale) v = 0.5f + std::fabs(normal(rng));
    }
    if (c.bias) {
      bias.resize(static_cast<size_t>(c.N));
      for (auto& v : bias) v = normal(rng);
    }
  }

  WeightView View(bool f16_scales) const {
    WeightView v;
    v.fmt = f;
    v.B = B.data();
    v.scales = f16_scales ? static_cast<const void*>(scales16.data()) : scales32.data();
    v.scales_f16 = f16_scales;
    v.zero_points = zp.empty() ? nullptr : zp.data();
    v.sub_scales = sub.empty() ? nullptr : sub.data();
    if (!cb_raw.empty()) {
      v.codebook = cb.values.data();
      v.codebook_rows = cb.rows;
      v.codebook_i8 = cb.values_i8.data();
      v.codebook_i8_scale = cb.scale_i8.data();
    }
    return v;
  }
};

ParallelFor ThreadedFor(int threads) {
  return [threads](int64_t n, const std::function<void(int64_t)>& fn) {
    std::atomic<int64_t> next{0};
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t)
      pool.emplace_back([&] {
        for (int64_t i; (i = next.fetch_add(1)) < n;) fn(i);
      });
    for (auto& th : pool) th.join();
  };
}

std::vector<float> Run(const Case& c, const RandomWeight& w, const KernelTable* kernels,
                       const std::vector<float>& a, const ParallelFor& pf) {
  MatMulPlan plan;
  plan.w = w.View(c.f16_scales);
  plan.path = c.path;
  plan.kernels = kernels;
  plan.input_scale = w.input_scale.empty() ? nullptr : w.input_scale.data();
  plan.bias = w.bias.empty() ? nullptr : w.bias.data();
  InitPlan(&plan);
  std::vector<float> y(static_cast<size_t>(c.M * c.N), NAN);
  if (c.f16_act) {
    std::vector<uint16_t> a16(a.size()), y16(y.size());
    for (size_t i = 0; i < a.size(); ++i) a16[i] = FloatToHalf(a[i]);
    RunMatMul(plan, a16.data(), ElemType::kFloat16, c.M, y16.data(), pf);
    for (size_t i = 0; i < y.size(); ++i) y[i] = HalfToFloat(y16[i]);
  } else {
    RunMatMul(plan, a.data(), ElemType::kFloat32, c.M, y.data(), pf);
  }
  return y;
}

// Activation quantization must be bit-exact across ISAs (the numpy reference relies on it).
bool CheckQuantize(const KernelTable* kt, std::mt19937& rng, std::string* why) {
  WeightFormat f;
  f.K = 300;
  f.N = 1;
  f.bits = 4;
  f.group_size = 0;
  const auto blocks = MakeKBlocks(f, kActBlockMax);
  const int64_t M = 5, ks = f.k_stored(), nb = static_cast<int64_t>(blocks.size());
  std::normal_distribution<float> normal(0.0f, 3.0f);
  std::vector<float> a(static_cast<size_t>(M * ks));
  for (auto& v : a) v = normal(rng);
  for (int64_t k = 0; k < 64; ++k) a[2 * ks + k] = 0.0f;  // an all-zero block
  std::vector<int8_t> q0(a.size()), q1(a.size());
  std::vector<float> s0(M * nb), s1(M * nb);
  std::vector<int32_t> u0(M * nb), u1(M * nb);
  RefKernels()->quantize_activations(a.data(), M, ks, blocks.data(), nb, q0.data(), s0.data(), u0.data());
  kt->quantize_activations(a.data(), M, ks, blocks.data(), nb, q1.data(), s1.data(), u1.data());
  if (q0 != q1 || u0 != u1 || std::memcmp(s0.data(), s1.data(), s0.size() * sizeof(float))) {
    *why = "quantize_activations differs from the reference";
    return false;
  }
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> isas;
  int cases = 400;
  unsigned seed = 1234;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "--isa" && i + 1 < argc) isas.push_back(argv[++i]);
    else if (arg == "--cases" && i + 1 < argc) cases = std::atoi(argv[++i]);
    else if (arg == "--seed" && i + 1 < argc) seed = static_cast<unsigned>(std::atoi(argv[++i]));
    else {
      std::fprintf(stderr, "usage: %s [--isa NAME] [--cases N] [--seed S]\n", argv[0]);
      return 2;
    }
  }
  if (isas.empty()) {
    for (const char* name : {"ref", "avx2", "avx512", "neon", "neon-dotprod"}) {
      std::string why;
      if (KernelsByName(name, &why)) isas.push_back(name);
    }
  }
  std::printf("kernel sets under test: ");
  for (auto& s : isas) std::printf("%s ", s.c_str());
  std::printf("\n");

  int passed = 0, failed = 0;
  std::mt19937 rng(seed);
  const int64_t Ms[] = {1, 2, 3, 7, 64, 129};
  const int64_t Ns[] = {1, 7, 64, 4097, 33};
  const int bits_list[] = {2, 3, 4, 8};
  const int64_t groups[] = {32, 64, 128, 0, 16};
  for (const std::string& name : isas) {
    std::string why;
    const KernelTable* kt = KernelsByName(name, &why);
    if (!kt) {
      std::printf("FAIL %s: %s\n", name.c_str(), why.c_str());
      ++failed;
      continue;
    }
    if (CheckQuantize(kt, rng, &why)) ++passed;
    else {
      std::printf("FAIL %s: %s\n", name.c_str(), why.c_str());
      ++failed;
    }
    for (int i = 0; i < cases; ++i) {
      Case c;
      c.M = Ms[i % 6];
      c.N = Ns[(i / 6) % 5];
      c.bits = bits_list[(i / 30) % 4];
      c.path = (i / 120) % 2 ? ComputePath::kInt8 : ComputePath::kFloat;
      c.layout = (i / 240) % 2 ? Layout::kRow : Layout::kTile16;
      c.group_size = groups[rng() % 5];
      const int64_t g = c.group_size ? c.group_size : 48;
      // K with and without a partial last group
      c.K = (rng() % 2) ? g * (1 + rng() % 3) : g * (1 + rng() % 3) + 1 + rng() % (g - 1);
      if (c.N == 4097 && c.M > 7) c.M = 3;  // keep the big-N cases fast
      c.codebook = rng() % 5 == 0;
      c.symmetric = !c.codebook && rng() % 4 == 0;
      c.hierarchical = !c.codebook && !c.symmetric && rng() % 4 == 0;
      c.input_scale = rng() % 6 == 0;
      c.bias = rng() % 3 == 0;
      c.f16_scales = rng() % 2;
      c.f16_act = rng() % 8 == 0;
      RandomWeight w(c, rng);
      std::normal_distribution<float> normal(0.0f, 1.0f);
      std::vector<float> a(static_cast<size_t>(c.M * c.K));
      for (auto& v : a) v = normal(rng);
      const auto ref = Run(c, w, RefKernels(), a, SerialFor());
      const auto got = Run(c, w, kt, a, ThreadedFor(3));
      double max_ref = 0.0, max_err = 0.0;
      bool finite = true;
      for (size_t j = 0; j < ref.size(); ++j) {
        finite = finite && std::isfinite(got[j]);
        max_ref = std::max(max_ref, std::fabs(static_cast<double>(ref[j])));
        max_err = std::max(max_err, std::fabs(static_cast<double>(ref[j]) - got[j]));
      }
      // Same integer dots / same dequantized weights; only float summation order differs.
      const double tol = (c.f16_act ? 2e-3 : 2e-5) * std::max(max_ref, 1e-3) + 1e-6;
      if (finite && max_err <= tol) {
        ++passed;
      } else {
        ++failed;
        std::printf("FAIL %s: %s max_err=%g tol=%g\n", name.c_str(), Describe(c).c_str(),
                    max_err, tol);
      }
    }
  }
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed ? 1 : 0;
}
