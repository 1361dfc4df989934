// Read-bandwidth roofline for the benchmarks: how long it takes this machine's best kernel
// table simply to read a buffer with `threads` threads. Exported from the op library so that
// `python -m quantx_onnx bench kernels` can put it beside every timing.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <thread>
#include <vector>

#include "quantx/dispatch.h"

extern "C" __attribute__((visibility("default"))) double QuantxStreamReadMs(const void* data,
                                                                           uint64_t bytes,
                                                                           int threads, int iters) {
  using namespace quantx;
  std::string why;
  const KernelTable* kt = SelectKernels(&why);
  auto stream = kt && kt->stream_read ? kt->stream_read : StreamReadPortable;
  threads = std::max(1, threads);
  iters = std::max(1, iters);
  const uint8_t* p = static_cast<const uint8_t*>(data);
  const int64_t per = static_cast<int64_t>(bytes) / threads / 64 * 64;
  std::vector<double> times;
  std::atomic<uint64_t> sink{0};
  std::atomic<int> ready{0}, go{0}, done{0};
  // workers spin on `go` so thread start-up is outside the timed region
  std::vector<std::thread> pool;
  for (int t = 1; t < threads; ++t)
    pool.emplace_back([&, t] {
      for (int it = 1; it <= iters; ++it) {
        ready.fetch_add(1);
        while (go.load() < it) {
        }
        sink += stream(p + t * per, t == threads - 1 ? static_cast<int64_t>(bytes) - t * per : per);
        done.fetch_add(1);
      }
    });
  for (int it = 1; it <= iters; ++it) {
    while (ready.load() < (threads - 1) * it) {
    }
    const auto t0 = std::chrono::steady_clock::now();
    go.store(it);
    sink += stream(p, threads == 1 ? static_cast<int64_t>(bytes) : per);
    while (done.load() < (threads - 1) * it) {
    }
    const auto t1 = std::chrono::steady_clock::now();
    times.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
  }
  for (auto& th : pool) th.join();
  std::sort(times.begin(), times.end());
  return times[times.size() / 2] + (sink.load() == 42 ? 1e-12 : 0.0);
}
