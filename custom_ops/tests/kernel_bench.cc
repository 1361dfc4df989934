// Kernel micro-benchmark without ONNX Runtime (for kernel development; the user-facing
// comparison against ORT is `python -m quantx_onnx bench kernels`).
//
//   quantx_kernel_bench --isa avx512 --K 4096 --N 4096 --M 1 --bits 3 --group 64
//                       [--layout 1] [--path 4] [--threads 2] [--iters 200] [--rotate 1]
//                       [--scale-bits 4 --super-group 8]  (hierarchical scales, as models use)
// Prints the median time per matmul and the weight bytes streamed per second.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "kernels/decode.h"
#include "quantx/dispatch.h"
#include "quantx/hadamard.h"
#include "quantx/matmul.h"

using namespace quantx;

namespace {

// A persistent pool so that thread start-up is not timed.
class Pool {
 public:
  explicit Pool(int threads) : n_(threads) {
    for (int t = 1; t < n_; ++t) workers_.emplace_back([this] { Loop(); });
  }
  ~Pool() {
    stop_ = true;
    gen_.fetch_add(1);
    for (auto& w : workers_) w.join();
  }
  void For(int64_t n, const std::function<void(int64_t)>& fn) {
    fn_ = &fn;
    total_ = n;
    next_ = 0;
    done_ = 0;
    gen_.fetch_add(1);
    Work();
    while (done_.load() < n_ - 1) {
    }
  }

 private:
  void Work() {
    for (int64_t i; (i = next_.fetch_add(1)) < total_;) (*fn_)(i);
  }
  void Loop() {
    int64_t seen = 0;  // generation at construction: no round can be missed
    while (true) {
      while (gen_.load() == seen) {
      }
      seen = gen_.load();
      if (stop_) return;
      Work();
      done_.fetch_add(1);
    }
  }
  int n_;
  std::vector<std::thread> workers_;
  std::atomic<int64_t> gen_{0}, next_{0}, total_{0};
  std::atomic<int> done_{0};
  std::atomic<bool> stop_{false};
  const std::function<void(int64_t)>* fn_ = nullptr;
};

}  // namespace

int main(int argc, char** argv) {
  std::string isa = "ref";
  int64_t K = 4096, N = 4096, M = 1, group = 64;
  int bits = 3, layout = 1, path = 4, threads = 2, iters = 100, copies = 1, rotate = 0;
  int scale_bits = 0, super_group = 8;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i];
    const char* v = argv[i + 1];
    if (k == "--isa") isa = v;
    else if (k == "--K") K = std::atoll(v);
    else if (k == "--N") N = std::atoll(v);
    else if (k == "--M") M = std::atoll(v);
    else if (k == "--bits") bits = std::atoi(v);
    else if (k == "--group") group = std::atoll(v);
    else if (k == "--layout") layout = std::atoi(v);
    else if (k == "--path") path = std::atoi(v);
    else if (k == "--threads") threads = std::atoi(v);
    else if (k == "--iters") iters = std::atoi(v);
    else if (k == "--copies") copies = std::max(1, std::atoi(v));
    else if (k == "--rotate") rotate = std::atoi(v);
    else if (k == "--scale-bits") scale_bits = std::atoi(v);
    else if (k == "--super-group") super_group = std::atoi(v);
  }
  std::string why;
  const KernelTable* kt = KernelsByName(isa, &why);
  if (!kt) {
    std::fprintf(stderr, "%s\n", why.c_str());
    return 2;
  }
  WeightFormat f;
  f.K = K;
  f.N = N;
  f.bits = bits;
  f.group_size = group;
  f.layout = static_cast<Layout>(layout);
  f.scale_bits = scale_bits;
  f.super_group = scale_bits ? super_group : 0;
  if (!f.Validate().empty()) {
    std::fprintf(stderr, "%s\n", f.Validate().c_str());
    return 2;
  }
  if (rotate && !IsHadamardSize(K)) {
    std::fprintf(stderr, "--rotate 1 needs K = 12^a * 2^b, got K=%lld\n", (long long)K);
    return 2;
  }
  const PackedShapes s = ExpectedShapes(f);
  auto count = [](const std::vector<int64_t>& v) {
    int64_t n = 1;
    for (int64_t d : v) n *= d;
    return static_cast<size_t>(n);
  };
  std::mt19937 rng(1);
  // --copies C: rotate over C distinct weight copies (C x the weight bytes beyond the last-level
  // cache makes every run read from DRAM, as a real model's decode does)
  const size_t per_copy = count(s.B);
  std::vector<uint8_t> B(per_copy * copies), zp(count(s.zero_points) * copies),
      sub(count(s.sub_scales) * copies);
  for (auto& b : B) b = static_cast<uint8_t>(rng());
  for (auto& b : zp) b = static_cast<uint8_t>(rng());
  for (auto& b : sub) b = static_cast<uint8_t>(rng());
  std::vector<uint16_t> scales(count(s.scales) * copies, FloatToHalf(0.01f));
  std::vector<float> a(static_cast<size_t>(M * K)), y(static_cast<size_t>(M * N));
  std::normal_distribution<float> normal;
  for (auto& v : a) v = normal(rng);

  MatMulPlan plan;
  plan.w.fmt = f;
  plan.w.B = B.data();
  plan.w.scales = scales.data();
  plan.w.scales_f16 = true;
  plan.w.zero_points = zp.data();
  plan.w.sub_scales = scale_bits ? sub.data() : nullptr;
  plan.path = static_cast<ComputePath>(path);
  plan.kernels = kt;
  plan.rotate = rotate != 0;  // K must then be 12^a * 2^b
  InitPlan(&plan);

  Pool pool(threads);
  ParallelFor pf = [&](int64_t n, const std::function<void(int64_t)>& fn) { pool.For(n, fn); };
  std::vector<double> times;
  for (int it = 0; it < iters + 5; ++it) {
    const int c = it % copies;
    plan.w.B = B.data() + c * per_copy;
    plan.w.zero_points = zp.data() + c * (zp.size() / copies);
    plan.w.scales = scales.data() + c * (scales.size() / copies);
    if (scale_bits) plan.w.sub_scales = sub.data() + c * (sub.size() / copies);
    auto t0 = std::chrono::steady_clock::now();
    RunMatMul(plan, a.data(), ElemType::kFloat32, M, y.data(), pf);
    auto t1 = std::chrono::steady_clock::now();
    if (it >= 5) times.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
  }
  std::sort(times.begin(), times.end());
  const double med = times[times.size() / 2];
  // Streaming roofline: read the same bytes (rotating over as many copies), same threads.
  const size_t all_bytes = B.size() + zp.size() + sub.size() + scales.size() * 2;
  const size_t copy_bytes = all_bytes / copies / 64 * 64;
  std::vector<uint8_t> buf(copy_bytes * copies, 1);
  auto stream = kt->stream_read ? kt->stream_read : StreamReadPortable;
  std::vector<double> st;
  std::atomic<uint64_t> sink{0};
  const int64_t chunks = threads * 4, per = static_cast<int64_t>(copy_bytes) / 64 / chunks * 64;
  for (int it = 0; it < iters + 5; ++it) {
    const uint8_t* base = buf.data() + (it % copies) * copy_bytes;
    auto t0 = std::chrono::steady_clock::now();
    pf(chunks, [&](int64_t c) {
      const int64_t n = c == chunks - 1 ? static_cast<int64_t>(copy_bytes) - c * per : per;
      sink += stream(base + c * per, n);
    });
    auto t1 = std::chrono::steady_clock::now();
    if (it >= 5) st.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
  }
  std::sort(st.begin(), st.end());
  const double roof = st[st.size() / 2];
  const double bytes = static_cast<double>(all_bytes) / copies;
  std::printf("isa=%s M=%lld K=%lld N=%lld bits=%d group=%lld layout=%d path=%d rotate=%d "
              "scale_bits=%d threads=%d: "
              "%.4f ms  %.1f GB/s  %.1f GMAC/s  (stream %.4f ms, %.2fx)\n",
              kt->name, (long long)M, (long long)K, (long long)N, bits, (long long)group, layout,
              path, rotate, scale_bits, threads, med, bytes / med / 1e6,
              double(M) * K * N / med / 1e6, roof, med / roof);
  return 0;
}
