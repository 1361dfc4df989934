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
  int scale_bits = 4, super_group = 3;  // hierarchical only
  // 0: random operands. 1-4: every packed byte (codes, zero points, sub-scales) 0x00 (1, 2) or
  // 0xff (3, 4), codebook rows spanning the full int8 range, all activations +1 (odd) or -1
  // (even; int8 path: all +-127) -- the operands that bound a kernel's integer accumulations.
  int extreme = 0;
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
      f.scale_bits = c.scale_bits;
      f.super_group = c.super_group;
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

// Compares one case against the reference; prints a FAIL line on mismatch.
bool CheckCase(const std::string& name, const KernelTable* kt, const Case& c, std::mt19937& rng) {
  RandomWeight w(c, rng);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> a(static_cast<size_t>(c.M * c.K));
  for (auto& v : a) v = normal(rng);
  if (c.extreme) {
    const uint8_t fill = c.extreme <= 2 ? 0x00 : 0xff;
    std::fill(w.B.begin(), w.B.end(), fill);
    std::fill(w.zp.begin(), w.zp.end(), fill);
    std::fill(w.sub.begin(), w.sub.end(), fill);
    if (!w.cb_raw.empty()) {  // the codes' codebook entries at +-max: int8 values +-127
      const int levels = w.f.levels();
      for (int64_t r = 0; r < w.cb.rows; ++r) {
        w.cb_raw[r * levels] = -4.0f;
        w.cb_raw[r * levels + levels - 1] = 4.0f;
      }
      w.cb = MakeCodebookTables(w.cb_raw.data(), false, w.cb.rows, levels);
    }
    for (auto& v : a) v = c.extreme % 2 ? 1.0f : -1.0f;
  }
  const auto ref = Run(c, w, RefKernels(), a, SerialFor());
  const auto got = Run(c, w, kt, a, ThreadedFor(3));
  double max_ref = 0.0, max_err = 0.0;
  bool finite = true;
  for (size_t j = 0; j < ref.size(); ++j) {
    finite = finite && std::isfinite(got[j]);
    max_ref = std::max(max_ref, std::fabs(static_cast<double>(ref[j])));
    max_err = std::max(max_err, std::fabs(static_cast<double>(ref[j]) - got[j]));
  }
  const double tol = (c.f16_act ? 2e-3 : 2e-5) * std::max(max_ref, 1e-3) + 1e-6;
  if (finite && max_err <= tol) return true;
  std::printf("FAIL %s: %s scale_bits=%d extreme=%d max_err=%g tol=%g\n", name.c_str(),
              Describe(c).c_str(), c.scale_bits, c.extreme, max_err, tol);
  return false;
}

// Extra cases aimed at the edges of SIMD kernels (ISA-agnostic): the decode / prefill row
// boundary (M = 4, 5) and small row remainders, row chunks past the driver's 256 (M = 300),
// every hierarchical sub-scale width.
Case ExtraCase(int i, std::mt19937& rng) {
  const int64_t Ms[] = {4, 5, 6, 8, 1, 300};
  const int64_t Ns[] = {16, 48, 17, 100};
  const int bits_list[] = {2, 3, 4, 8};
  const int64_t groups[] = {16, 32, 64, 128, 256, 0};
  Case c;
  c.path = i % 2 ? ComputePath::kInt8 : ComputePath::kFloat;
  c.bits = bits_list[(i / 2) % 4];
  c.M = Ms[(i / 8) % 6];
  c.N = Ns[rng() % 4];
  c.layout = rng() % 4 == 0 ? Layout::kRow : Layout::kTile16;
  c.group_size = groups[rng() % 6];
  const int64_t g = c.group_size ? c.group_size : 80;
  c.K = (rng() % 2) ? g * (1 + rng() % 3) : g * (1 + rng() % 3) + 1 + rng() % (g - 1);
  if (c.M == 300) c.K = std::min<int64_t>(c.K, 160);  // keep the many-row cases fast
  c.codebook = rng() % 5 == 0;
  c.symmetric = !c.codebook && rng() % 4 == 0;
  c.hierarchical = !c.codebook && !c.symmetric && rng() % 3 == 0;
  c.scale_bits = 2 + static_cast<int>(rng() % 7);
  c.super_group = 2 + static_cast<int>(rng() % 3);
  c.input_scale = rng() % 6 == 0;
  c.bias = rng() % 3 == 0;
  c.f16_scales = rng() % 2;
  c.f16_act = rng() % 8 == 0;
  return c;
}

// Saturating operands (Case::extreme), every combination of path, bits, extreme, few rows /
// many rows, and (TILE16 uniform grid, TILE16 codebook, ROW uniform grid): 192 cases.
Case ExtremeCase(int i, std::mt19937& rng) {
  const int bits_list[] = {2, 3, 4, 8};
  const int64_t groups[] = {16, 32, 128, 0};
  Case c;
  c.path = i % 2 ? ComputePath::kInt8 : ComputePath::kFloat;
  c.bits = bits_list[(i / 2) % 4];
  c.extreme = 1 + (i / 8) % 4;
  c.M = (i / 32) % 2 ? 6 : 3;
  const int kind = (i / 64) % 3;
  c.layout = kind == 2 ? Layout::kRow : Layout::kTile16;
  c.codebook = kind == 1;
  c.N = 17;
  c.group_size = groups[rng() % 4];
  c.K = c.group_size ? c.group_size * (1 + rng() % 2) : 272;
  c.symmetric = !c.codebook && rng() % 4 == 0;
  c.hierarchical = !c.codebook && !c.symmetric && rng() % 3 == 0;
  c.scale_bits = 2 + static_cast<int>(rng() % 7);
  c.input_scale = c.f16_act = false;
  c.bias = rng() % 2;
  c.f16_scales = rng() % 2;
  return c;
}

// Direct calls on sub-ranges of tiles and rows, as a threaded driver issues them, with
// ldy > N: the table must write exactly those rows and valid columns, with the reference's
// values, and leave every other element of Y alone.
bool CheckSubRanges(const std::string& name, const KernelTable* kt, std::mt19937& rng) {
  const int bits_list[] = {2, 3, 4, 8};
  bool ok = true;
  for (int trial = 0; trial < 16; ++trial) {
    Case c;
    c.M = 11;
    c.N = 50;  // 4 tiles, the last one partial
    c.bits = bits_list[trial % 4];
    c.path = trial / 4 % 2 ? ComputePath::kInt8 : ComputePath::kFloat;
    c.layout = trial / 8 ? Layout::kRow : Layout::kTile16;
    c.group_size = trial % 3 ? 32 : 0;
    c.K = 90;
    c.codebook = trial % 7 == 6;
    c.symmetric = !c.codebook && trial % 5 == 0;
    c.hierarchical = !c.codebook && !c.symmetric && trial % 3 == 1;
    c.input_scale = c.f16_act = false;
    c.bias = trial % 2 == 0;
    c.f16_scales = trial % 2;
    RandomWeight rw(c, rng);
    const WeightView view = rw.View(c.f16_scales);
    const WeightFormat& f = view.fmt;
    const std::vector<KBlock> blocks = MakeKBlocks(f, kActBlockMax);
    const int64_t ks = f.k_stored(), nb = static_cast<int64_t>(blocks.size());
    const int64_t lda = ks + 5, ldy = c.N + 3, T = f.n_tiles();
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::vector<float> a(static_cast<size_t>(c.M * lda));
    for (auto& v : a) v = normal(rng);
    std::vector<int8_t> a8(a.size());
    std::vector<float> sa(static_cast<size_t>(c.M * nb));
    std::vector<int32_t> su(sa.size());
    RefKernels()->quantize_activations(a.data(), c.M, lda, blocks.data(), nb, a8.data(),
                                       sa.data(), su.data());
    MatMulArgs args;
    args.w = &view;
    args.blocks = blocks.data();
    args.n_blocks = nb;
    args.path = c.path;
    args.M = c.M;
    args.a_f32 = a.data();
    args.lda = lda;
    args.a_i8 = a8.data();
    args.a_scale = sa.data();
    args.a_sum = su.data();
    args.ldy = ldy;
    args.bias = c.bias ? rw.bias.data() : nullptr;
    std::vector<float> ref(static_cast<size_t>(c.M * ldy), NAN), got(ref.size());
    args.y = ref.data();
    RefKernels()->matmul(args, 0, T, 0, c.M);
    const int64_t ranges[][4] = {{0, T, 0, c.M}, {1, 3, 2, 5}, {0, T, 3, 4}, {2, 4, 1, 9},
                                 {T - 1, T, 0, c.M}, {1, 2, 6, 11}, {0, 1, 0, 2}};
    for (const auto& rg : ranges) {
      std::fill(got.begin(), got.end(), NAN);
      args.y = got.data();
      kt->matmul(args, rg[0], rg[1], rg[2], rg[3]);
      double max_ref = 0.0, max_err = 0.0;
      bool layout_ok = true;
      for (int64_t m = 0; m < c.M; ++m)
        for (int64_t n = 0; n < ldy; ++n) {
          const size_t i = static_cast<size_t>(m * ldy + n);
          const bool inside = m >= rg[2] && m < rg[3] && n < c.N && n / kTileN >= rg[0] &&
                              n / kTileN < rg[1];
          if (!inside) {
            layout_ok = layout_ok && std::isnan(got[i]);
            continue;
          }
          layout_ok = layout_ok && std::isfinite(got[i]);
          max_ref = std::max(max_ref, std::fabs(static_cast<double>(ref[i])));
          max_err = std::max(max_err, std::fabs(static_cast<double>(ref[i]) - got[i]));
        }
      const double tol = 2e-5 * std::max(max_ref, 1e-3) + 1e-6;
      if (!layout_ok || max_err > tol) {
        std::printf("FAIL %s: sub-range tiles [%lld, %lld) rows [%lld, %lld) of %s: %s "
                    "max_err=%g\n",
                    name.c_str(), (long long)rg[0], (long long)rg[1], (long long)rg[2],
                    (long long)rg[3], Describe(c).c_str(),
                    layout_ok ? "values differ" : "wrote outside its range", max_err);
        ok = false;
      }
    }
  }
  return ok;
}

// Rounding ties: blocks with peak 127 (inv = 1) or 254 (inv = 0.5) of values whose product
// with inv is an exact half, which only round-to-nearest-even maps like the reference.
bool CheckQuantizeTies(const KernelTable* kt, std::mt19937& rng, std::string* why) {
  WeightFormat f;
  f.K = 512;
  f.N = 1;
  f.bits = 4;
  f.group_size = 0;
  const auto blocks = MakeKBlocks(f, kActBlockMax);
  const int64_t M = 3, ks = f.k_stored(), nb = static_cast<int64_t>(blocks.size());
  std::vector<float> a(static_cast<size_t>(M * ks));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t bi = 0; bi < nb; ++bi) {
      const KBlock& b = blocks[bi];
      const float peak = bi % 2 ? 254.0f : 127.0f;
      for (int64_t k = 0; k < b.length; ++k) {
        const int v = static_cast<int>(rng() % 253) - 126;  // -126..126
        a[m * ks + b.offset + k] = bi % 2 ? static_cast<float>(2 * v + 1) : v + 0.5f;
      }
      a[m * ks + b.offset + rng() % b.length] = (rng() % 2 ? 1.0f : -1.0f) * peak;
    }
  std::vector<int8_t> q0(a.size()), q1(a.size());
  std::vector<float> s0(M * nb), s1(M * nb);
  std::vector<int32_t> u0(M * nb), u1(M * nb);
  RefKernels()->quantize_activations(a.data(), M, ks, blocks.data(), nb, q0.data(), s0.data(),
                                     u0.data());
  kt->quantize_activations(a.data(), M, ks, blocks.data(), nb, q1.data(), s1.data(), u1.data());
  if (q0 != q1 || u0 != u1 || std::memcmp(s0.data(), s1.data(), s0.size() * sizeof(float))) {
    *why = "quantize_activations rounds ties unlike the reference";
    return false;
  }
  return true;
}

// Long k axes (ISA-agnostic): more than 512 stored k per tile, so that kernels which unpack a
// tile in chunks of k-blocks see several chunks, and blocks of 128 that span several int16
// accumulation windows; every decode row count (1-4) and small prefill counts; saturating
// operands on some of them.
Case LongKCase(int i, std::mt19937& rng) {
  const int64_t Ms[] = {1, 2, 3, 4, 5, 13};
  const int bits_list[] = {2, 3, 4, 8};
  const int64_t groups[] = {0, 256, 64, 128};
  Case c;
  c.path = i % 2 ? ComputePath::kInt8 : ComputePath::kFloat;
  c.bits = bits_list[(i / 2) % 4];
  c.M = Ms[(i / 8) % 6];
  c.N = 40;
  c.layout = rng() % 5 == 0 ? Layout::kRow : Layout::kTile16;
  c.group_size = groups[rng() % 4];
  c.K = 1100 + static_cast<int64_t>(rng() % 700);
  c.codebook = rng() % 6 == 0;
  c.symmetric = !c.codebook && rng() % 4 == 0;
  c.hierarchical = !c.codebook && !c.symmetric && rng() % 4 == 0;
  c.scale_bits = 2 + static_cast<int>(rng() % 7);
  c.super_group = 2 + static_cast<int>(rng() % 3);
  c.input_scale = rng() % 6 == 0;
  c.bias = rng() % 3 == 0;
  c.f16_scales = rng() % 2;
  c.f16_act = false;
  c.extreme = rng() % 4 == 0 ? 3 + static_cast<int>(rng() % 2) : 0;
  return c;
}

// stream_read (when the table has one) must read exactly [p, p + bytes): deterministic, changed
// by a byte inside the range, unchanged by bytes past it.
bool CheckStreamRead(const KernelTable* kt, std::mt19937& rng, std::string* why) {
  if (!kt->stream_read) return true;
  std::vector<uint8_t> buf(64 * 37 + 64);
  for (auto& b : buf) b = static_cast<uint8_t>(rng());
  for (int64_t bytes : {int64_t{64}, int64_t{64 * 5}, int64_t{64 * 37}}) {
    const uint64_t base = kt->stream_read(buf.data(), bytes);
    if (base != quantx::StreamReadPortable(buf.data(), bytes)) {
      *why = "stream_read checksum differs from StreamReadPortable's";
      return false;
    }
    buf[static_cast<size_t>(bytes)] ^= 0x5a;  // just past the range
    const bool same = kt->stream_read(buf.data(), bytes) == base;
    buf[static_cast<size_t>(bytes)] ^= 0x5a;
    const size_t inside = static_cast<size_t>(rng() % bytes);
    buf[inside] ^= 0x01;
    const bool changed = kt->stream_read(buf.data(), bytes) != base;
    buf[inside] ^= 0x01;
    if (!same || !changed) {
      *why = "stream_read does not read exactly its " + std::to_string(bytes) + " bytes";
      return false;
    }
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
    for (const char* name : {"ref", "avx2", "avx-vnni", "avx512", "neon", "neon-dotprod"}) {
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
    if (CheckQuantizeTies(kt, rng, &why)) ++passed;
    else {
      std::printf("FAIL %s: %s\n", name.c_str(), why.c_str());
      ++failed;
    }
    if (CheckStreamRead(kt, rng, &why)) ++passed;
    else {
      std::printf("FAIL %s: %s\n", name.c_str(), why.c_str());
      ++failed;
    }
    if (CheckSubRanges(name, kt, rng)) ++passed;
    else ++failed;
    for (int i = 0; i < (cases + 3) / 4; ++i) {
      if (CheckCase(name, kt, ExtraCase(i, rng), rng)) ++passed;
      else ++failed;
    }
    for (int i = 0; i < 192; ++i) {
      if (CheckCase(name, kt, ExtremeCase(i, rng), rng)) ++passed;
      else ++failed;
    }
    for (int i = 0; i < 96; ++i) {
      if (CheckCase(name, kt, LongKCase(i, rng), rng)) ++passed;
      else ++failed;
    }
  }
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed ? 1 : 0;
}
