// Kernel tests without ONNX Runtime: every SIMD kernel table usable on this CPU (or named on
// the command line) against the portable reference kernel, on randomized shapes and formats.
// The reference itself is checked against the numpy reference from the Python tests. Rotated
// weights (rotate = 1) are also checked against a dense H_K reference written out here.
//
//   quantx_kernel_tests [--isa NAME] [--cases N] [--seed S]
// Prints one line per failure and a final "N passed, M failed"; exit code 1 on any failure.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
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
  bool rotate = false;  // attribute rotate = 1 (randomized Hadamard transform of A)
};

std::string Describe(const Case& c) {
  char buf[256];
  std::snprintf(buf, sizeof buf,
                "M=%lld K=%lld N=%lld bits=%d g=%lld layout=%d path=%d sym=%d hier=%d cb=%d "
                "in_scale=%d bias=%d f16s=%d f16a=%d rot=%d",
                (long long)c.M, (long long)c.K, (long long)c.N, c.bits, (long long)c.group_size,
                (int)c.layout, (int)c.path, c.symmetric, c.hierarchical, c.codebook,
                c.input_scale, c.bias, c.f16_scales, c.f16_act, c.rotate);
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

MatMulPlan TestPlan(const Case& c, const RandomWeight& w, const KernelTable* kernels) {
  MatMulPlan plan;
  plan.w = w.View(c.f16_scales);
  plan.path = c.path;
  plan.kernels = kernels;
  plan.input_scale = w.input_scale.empty() ? nullptr : w.input_scale.data();
  plan.bias = w.bias.empty() ? nullptr : w.bias.data();
  plan.rotate = c.rotate;
  InitPlan(&plan);
  return plan;
}

std::vector<float> Run(const Case& c, const RandomWeight& w, const KernelTable* kernels,
                       const std::vector<float>& a, const ParallelFor& pf) {
  const MatMulPlan plan = TestPlan(c, w, kernels);
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

// Relative tolerance against the reference's largest output. fp32 sums of K same-signed terms
// (the saturating cases) may differ by up to about K ulps between summation orders, so long
// k axes get K * 2^-24 where that exceeds 2e-5.
double RelativeTolerance(const Case& c) {
  return c.f16_act ? 2e-3 : std::max(2e-5, static_cast<double>(c.K) * 0x1p-24);
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
  const double tol = RelativeTolerance(c) * std::max(max_ref, 1e-3) + 1e-6;
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
  const int bits_list[] = {2, 3, 4, 5, 6, 8};
  const int64_t groups[] = {16, 32, 64, 128, 256, 0};
  Case c;
  c.path = i % 2 ? ComputePath::kInt8 : ComputePath::kFloat;
  c.bits = bits_list[(i / 2) % 6];
  c.M = Ms[(i / 12) % 6];
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
// many rows, and (TILE16 uniform grid, TILE16 codebook, ROW uniform grid): 288 cases.
Case ExtremeCase(int i, std::mt19937& rng) {
  const int bits_list[] = {2, 3, 4, 5, 6, 8};
  const int64_t groups[] = {16, 32, 128, 0};
  Case c;
  c.path = i % 2 ? ComputePath::kInt8 : ComputePath::kFloat;
  c.bits = bits_list[(i / 2) % 6];
  c.extreme = 1 + (i / 12) % 4;
  c.M = (i / 48) % 2 ? 6 : 3;
  const int kind = (i / 96) % 3;
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
  const int bits_list[] = {2, 3, 4, 5, 6, 8};
  bool ok = true;
  for (int trial = 0; trial < 24; ++trial) {
    Case c;
    c.M = 11;
    c.N = 50;  // 4 tiles, the last one partial
    c.bits = bits_list[trial % 6];
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
  const int bits_list[] = {2, 3, 4, 5, 6, 8};
  const int64_t groups[] = {0, 256, 64, 128};
  Case c;
  c.path = i % 2 ? ComputePath::kInt8 : ComputePath::kFloat;
  c.bits = bits_list[(i / 2) % 6];
  c.M = Ms[(i / 12) % 6];
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

// ---------------------------------------------------------------------------------------------
// Rotation (attribute rotate = 1). The definition of quantx/hadamard.h is written out again
// here as dense matrices, independently of src/hadamard.cc: the numpy reference's form.

// H_12 = I + S by the Paley construction (q = 11), row-major [12][12].
std::vector<int> PaleyH12() {
  auto chi = [](int x) {
    x = ((x % 11) + 11) % 11;
    if (x == 0) return 0;
    for (int r : {1, 3, 4, 5, 9})
      if (x == r) return 1;
    return -1;
  };
  std::vector<int> h(144, 0);
  for (int i = 0; i < 12; ++i) h[i * 12 + i] = 1;
  for (int j = 1; j < 12; ++j) h[j] += 1;       // S[0][j]
  for (int i = 1; i < 12; ++i) h[i * 12] -= 1;  // S[i][0]
  for (int i = 0; i < 11; ++i)
    for (int j = 0; j < 11; ++j) h[(1 + i) * 12 + 1 + j] += chi(j - i);
  return h;
}

// The factors of K = 12^a * 2^b, most significant first (the 12s, then the 2s); false if K has
// another form.
bool HadamardFactors(int64_t K, std::vector<int>* fs) {
  fs->clear();
  if (K < 1) return false;
  while (K % 3 == 0) {
    if (K % 12) return false;
    K /= 12;
    fs->push_back(12);
  }
  while (K % 2 == 0) {
    K /= 2;
    fs->push_back(2);
  }
  return K == 1;
}

// Dense H_K, row-major [K][K] (entries +-1): Kronecker products, the first factor most
// significant: kron(A, B)[i * mB + p][j * mB + q] = A[i][j] * B[p][q].
std::vector<float> DenseHadamard(int64_t K) {
  std::vector<int> fs;
  HadamardFactors(K, &fs);
  const std::vector<int> h12 = PaleyH12();
  const int h2[4] = {1, 1, 1, -1};
  std::vector<float> h(1, 1.0f);
  int64_t n = 1;
  for (int m : fs) {
    const int* hm = m == 12 ? h12.data() : h2;
    const int64_t nm = n * m;
    std::vector<float> next(static_cast<size_t>(nm * nm));
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < n; ++j)
        for (int p = 0; p < m; ++p)
          for (int q = 0; q < m; ++q)
            next[(i * m + p) * nm + j * m + q] = h[i * n + j] * hm[p * m + q];
    h.swap(next);
    n = nm;
  }
  return h;
}

// DenseHadamard of the matmul cases' K (at most 1536: 9 MB), kept between cases.
const std::vector<float>& CachedHadamard(int64_t K) {
  static std::map<int64_t, std::vector<float>> cache;
  auto it = cache.find(K);
  if (it == cache.end()) it = cache.emplace(K, DenseHadamard(K)).first;
  return it->second;
}

// H_K[k][k2] from the definition: the digits of k and k2 in the factors' mixed radix (the
// first factor most significant), the product of the factors' entries at those digits.
int HadamardEntry(const std::vector<int>& fs, const std::vector<int>& h12, int64_t k, int64_t k2) {
  int v = 1;
  for (size_t f = fs.size(); f-- > 0;) {
    const int m = fs[f];
    const int i = static_cast<int>(k % m), j = static_cast<int>(k2 % m);
    k /= m;
    k2 /= m;
    v *= m == 12 ? h12[i * 12 + j] : (i && j ? -1 : 1);
  }
  return v;
}

// The signs d: xorshift32 from 0x2545F491, the state updated before each k's sign is read.
std::vector<double> XorshiftSigns(int64_t K) {
  std::vector<double> d(static_cast<size_t>(K));
  uint32_t s = 0x2545F491u;
  for (auto& v : d) {
    s ^= s << 13;
    s ^= s >> 17;
    s ^= s << 5;
    v = (s >> 31) ? -1.0 : 1.0;
  }
  return d;
}

// The definitions: H_12 @ H_12^T = 12 I and the library's H_12 is Paley's; the library's signs;
// which K are Hadamard sizes; the dense Kronecker product is the entry-wise definition, and
// H_K @ H_K^T = K I.
bool CheckHadamardDefinitions(std::string* why) {
  const std::vector<int> h12 = PaleyH12();
  for (int i = 0; i < 12; ++i)
    for (int j = 0; j < 12; ++j) {
      int dot = 0;
      for (int k = 0; k < 12; ++k) dot += h12[i * 12 + k] * h12[j * 12 + k];
      if (dot != (i == j ? 12 : 0)) {
        *why = "Paley H_12 @ H_12^T is not 12 I";
        return false;
      }
      if (Hadamard12(i, j) != h12[i * 12 + j]) {
        *why = "Hadamard12(" + std::to_string(i) + ", " + std::to_string(j) + ") is not Paley's";
        return false;
      }
    }
  const std::vector<double> d = XorshiftSigns(4096);
  const std::vector<float> lib = HadamardSigns(4096);
  for (size_t k = 0; k < d.size(); ++k)
    if (lib[k] != d[k]) {
      *why = "HadamardSigns differs from xorshift32 at k=" + std::to_string(k);
      return false;
    }
  for (int64_t K : {1, 2, 4, 12, 24, 48, 64, 96, 144, 192, 288, 384, 576, 768, 1536, 1728, 2304,
                    3072, 4096, 1 << 20}) {
    std::vector<int> fs;
    if (!IsHadamardSize(K) || !HadamardFactors(K, &fs)) {
      *why = "K=" + std::to_string(K) + " not taken as 12^a * 2^b";
      return false;
    }
  }
  for (int64_t K : {0, -12, 3, 6, 36, 72, 100, 320, 1000, 11008, 4095}) {
    std::vector<int> fs;
    if (IsHadamardSize(K) || HadamardFactors(K, &fs)) {
      *why = "K=" + std::to_string(K) + " taken as 12^a * 2^b";
      return false;
    }
  }
  for (int64_t K : {288, 96, 144}) {
    std::vector<int> fs;
    HadamardFactors(K, &fs);
    const std::vector<float> h = DenseHadamard(K);
    for (int64_t i = 0; i < K; ++i)
      for (int64_t j = 0; j < K; ++j) {
        if (h[i * K + j] != HadamardEntry(fs, h12, i, j)) {
          *why = "dense H_" + std::to_string(K) + " is not the Kronecker definition";
          return false;
        }
        double dot = 0.0;
        for (int64_t k = 0; k < K; ++k) dot += h[i * K + k] * h[j * K + k];
        if (dot != (i == j ? K : 0)) {
          *why = "H_" + std::to_string(K) + " @ H^T is not K I";
          return false;
        }
      }
  }
  return true;
}

// HadamardTransform alone against x @ H_K / sqrt(K) from the dense matrix, in double: random
// rows and unit rows (a unit row e_k gives row k of H_K: the orientation), for every form of K
// (12s only, 2s only, both; K = 1); and transposed, against x @ H_K^T / sqrt(K) (QxGather's
// inverse rotation: a unit row then gives column k).
bool CheckHadamardTransform(std::mt19937& rng, std::string* why) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  double worst = 0.0;
  for (int64_t K : {1, 2, 4, 12, 24, 48, 64, 96, 144, 192, 288, 384, 576, 768, 1536, 1728, 2304,
                    4096}) {
    const std::vector<float> h = DenseHadamard(K);
    for (int row = 0; row < 4; ++row) {
      std::vector<float> x(static_cast<size_t>(K));
      if (row < 3) {
        for (auto& v : x) v = normal(rng);
      } else {
        x[rng() % K] = 1.0f;
      }
      for (const bool transposed : {false, true}) {
        std::vector<double> ref(static_cast<size_t>(K), 0.0);
        for (int64_t k = 0; k < K; ++k)
          for (int64_t j = 0; j < K; ++j)
            ref[j] += static_cast<double>(x[k]) * (transposed ? h[j * K + k] : h[k * K + j]);
        double peak = 0.0;
        for (auto& v : ref) {
          v /= std::sqrt(static_cast<double>(K));
          peak = std::max(peak, std::fabs(v));
        }
        std::vector<float> y = x;
        HadamardTransform(y.data(), K, transposed);
        double err = 0.0;
        for (int64_t j = 0; j < K; ++j) err = std::max(err, std::fabs(y[j] - ref[j]));
        worst = std::max(worst, err / peak);
        if (!(err <= 1e-5 * peak)) {
          char buf[180];
          std::snprintf(buf, sizeof buf,
                        "HadamardTransform%s K=%lld row %d: max error %g of peak %g",
                        transposed ? " (transposed)" : "", (long long)K, row, err, peak);
          *why = buf;
          return false;
        }
      }
    }
  }
  std::printf("HadamardTransform: worst relative error %.3g against the dense H_K\n", worst);
  return true;
}

// A table's own transform (KernelTable::hadamard) against HadamardTransform, bit for bit: it
// promises the same additions in the same order, so rotated weights give the same activations
// on every ISA. Every K form (the gathered rows of 12^a * 4, butterflies in lanes and across
// vectors, the fallback), random rows with values of mixed magnitude.
bool CheckTableHadamard(const KernelTable* kt, std::mt19937& rng, std::string* why) {
  if (!kt->hadamard) return true;
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (int64_t K : {1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 144, 192, 288, 384, 576, 768, 1152,
                    1536, 1728, 2304, 4096, 6912}) {
    for (int row = 0; row < 3; ++row) {
      std::vector<float> x(static_cast<size_t>(K));
      for (auto& v : x) v = normal(rng) * std::exp2(static_cast<float>(rng() % 17) - 8.0f);
      std::vector<float> want = x, got = x;
      HadamardTransform(want.data(), K);
      kt->hadamard(got.data(), K);
      for (int64_t k = 0; k < K; ++k)
        if (std::memcmp(&want[k], &got[k], sizeof(float)) != 0) {
          char buf[160];
          std::snprintf(buf, sizeof buf, "hadamard K=%lld row %d: element %lld is %.9g, not %.9g",
                        (long long)K, row, (long long)k, got[k], want[k]);
          *why = buf;
          return false;
        }
    }
  }
  return true;
}

// attend_decode against the definition in double precision: rotate-half rotary on the new key
// and the queries, the append at position length - 1, softmax over the scores plus bias (some
// positions masked with the lowest float), the weighted sum of values. Head widths with and
// without the kernel's register-held outputs, caches longer than the valid length, no rotary.
bool CheckDecodeAttention(const KernelTable* kt, std::mt19937& rng, std::string* why) {
  if (!kt->attend_decode) return true;
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> unit(-1.0f, 1.0f);
  struct Shape {
    int64_t dim, group, length, capacity;
    bool rotary, bias;
  };
  const Shape shapes[] = {{64, 3, 1, 4, true, false},     {64, 3, 161, 200, true, true},
                          {128, 1, 37, 37, true, true},   {32, 4, 9, 16, false, true},
                          {48, 2, 70, 80, true, false},   {20, 3, 13, 13, true, true},
                          {64, 3, 1000, 1024, true, true}};
  for (const Shape& sh : shapes) {
    const int64_t D = sh.dim, G = sh.group, T = sh.length, C = sh.capacity, half = D / 2;
    std::vector<float> q(G * D), k_new(D), v_new(D), kc(C * D), vc(C * D), cos(half), sin(half);
    std::vector<float> bias(T), out(G * D), scratch(G * (T + D));
    for (auto* v : {&q, &k_new, &v_new, &kc, &vc})
      for (auto& x : *v) x = normal(rng);
    for (int64_t i = 0; i < half; ++i) {
      const float angle = 3.0f * unit(rng);
      cos[i] = std::cos(angle);
      sin[i] = std::sin(angle);
    }
    for (auto& b : bias) b = rng() % 4 == 0 ? std::numeric_limits<float>::lowest() : unit(rng);
    bias[T - 1] = 0.0f;
    const std::vector<float> kc0 = kc, vc0 = vc;
    DecodeAttentionArgs a;
    a.head_dim = D;
    a.group = G;
    a.length = T;
    a.q = q.data();
    a.k_new = k_new.data();
    a.v_new = v_new.data();
    a.k_cache = kc.data();
    a.v_cache = vc.data();
    a.cos = sh.rotary ? cos.data() : nullptr;
    a.sin = sh.rotary ? sin.data() : nullptr;
    a.bias = sh.bias ? bias.data() : nullptr;
    a.scale = 0.125f;
    a.out = out.data();
    a.scratch = scratch.data();
    kt->attend_decode(a);

    auto rotate = [&](const float* x, std::vector<double>& y) {
      y.assign(x, x + D);
      if (!sh.rotary) return;
      for (int64_t i = 0; i < half; ++i) {
        y[i] = double{x[i]} * cos[i] - double{x[i + half]} * sin[i];
        y[i + half] = double{x[i + half]} * cos[i] + double{x[i]} * sin[i];
      }
    };
    std::vector<double> key, query;
    rotate(k_new.data(), key);
    char buf[200];
    for (int64_t t = 0; t < C; ++t)
      for (int64_t d = 0; d < D; ++d) {
        const double want_k = t == T - 1 ? key[d] : kc0[t * D + d];
        const double want_v = t == T - 1 ? v_new[d] : vc0[t * D + d];
        if (std::fabs(kc[t * D + d] - want_k) > 1e-6 * (1 + std::fabs(want_k)) ||
            vc[t * D + d] != static_cast<float>(want_v)) {
          std::snprintf(buf, sizeof buf, "attend_decode D=%lld T=%lld: cache position %lld",
                        (long long)D, (long long)T, (long long)t);
          *why = buf;
          return false;
        }
      }
    for (int64_t j = 0; j < G; ++j) {
      rotate(q.data() + j * D, query);
      std::vector<double> s(T);
      double m = -1e300;
      for (int64_t t = 0; t < T; ++t) {
        double dot = 0.0;
        for (int64_t d = 0; d < D; ++d) dot += query[d] * kc[t * D + d];
        s[t] = dot * 0.125 + (sh.bias ? double{bias[t]} : 0.0);
        m = std::max(m, s[t]);
      }
      double sum = 0.0;
      for (auto& x : s) sum += (x = std::exp(x - m));
      for (int64_t d = 0; d < D; ++d) {
        double want = 0.0;
        for (int64_t t = 0; t < T; ++t) want += s[t] / sum * vc[t * D + d];
        if (std::fabs(out[j * D + d] - want) > 2e-5 * (1 + std::fabs(want))) {
          std::snprintf(buf, sizeof buf,
                        "attend_decode D=%lld G=%lld T=%lld: out[%lld][%lld] is %.7g, not %.7g",
                        (long long)D, (long long)G, (long long)T, (long long)j, (long long)d,
                        out[j * D + d], want);
          *why = buf;
          return false;
        }
      }
    }
  }
  return true;
}

// Expected output of a rotated case and its allowed error per element.
struct RotatedRef {
  std::vector<double> y, slack;  // [M][N]; slack: int8 path, rounding ties
  double mag = 0.0;              // the largest sum of |terms| of an output element
};

// The rotated matmul of case c, computed independently of the driver and kernels: A as the
// driver reads it (float16-rounded for f16_act), t = (a * input_scale * d) @ H_K / sqrt(K) in
// double from the dense H_K, then t @ W' + bias in double. Float path: W' from DequantColumn.
// Int8 path: t (as float) quantized per activation block as quantize_activations specifies
// (absmax, round half to even) against the int8-path weights UnpackTileU8 gives; an element
// of t within 1e-3 of a rounding tie may round the other way from the driver's float t, so
// slack allows one step there. transpose: H_K^T instead of H_K (a wrong orientation).
RotatedRef RotatedReference(const Case& c, const RandomWeight& w, const std::vector<float>& a,
                            bool transpose) {
  const WeightView view = w.View(c.f16_scales);
  const WeightFormat& f = view.fmt;
  const int64_t M = c.M, K = c.K, N = c.N, ks = f.k_stored();
  const bool int8 = c.path == ComputePath::kInt8;
  const std::vector<float>& h = CachedHadamard(K);
  const std::vector<double> d = XorshiftSigns(K);
  const std::vector<KBlock> blocks = MakeKBlocks(f, kActBlockMax);
  // W' as [N][K] (float path, logical k) or [N][k_stored] (int8 path, stored k).
  std::vector<double> wt;
  if (!int8) {
    wt.resize(static_cast<size_t>(N * K));
    std::vector<float> col(static_cast<size_t>(K));
    for (int64_t n = 0; n < N; ++n) {
      DequantColumn(view, n, col.data());
      for (int64_t k = 0; k < K; ++k) wt[n * K + k] = col[k];
    }
  } else {
    wt.assign(static_cast<size_t>(N * ks), 0.0);
    uint8_t u8[kActBlockMax * kTileN];
    float scale[kTileN], zero[kTileN];
    for (int64_t t = 0; t < f.n_tiles(); ++t)
      for (const KBlock& b : blocks) {
        UnpackTileU8(view, t, b, u8, scale, zero);
        for (int col = 0; col < kTileN && t * kTileN + col < N; ++col)
          for (int64_t k = 0; k < b.length; ++k)
            wt[(t * kTileN + col) * ks + b.offset + k] =
                static_cast<double>(scale[col]) *
                (u8[(k >> 2) * 64 + col * 4 + (k & 3)] - static_cast<double>(zero[col]));
      }
  }
  RotatedRef r;
  r.y.assign(static_cast<size_t>(M * N), 0.0);
  r.slack.assign(r.y.size(), 0.0);
  std::vector<double> u(static_cast<size_t>(K)), t(static_cast<size_t>(K));
  std::vector<double> q(static_cast<size_t>(ks)), sa(static_cast<size_t>(ks));
  std::vector<char> tie(static_cast<size_t>(ks));
  std::vector<float> tf(static_cast<size_t>(ks));
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t k = 0; k < K; ++k) {
      const float av = c.f16_act ? HalfToFloat(FloatToHalf(a[m * K + k])) : a[m * K + k];
      u[k] = av * (c.input_scale ? static_cast<double>(w.input_scale[k]) : 1.0) * d[k];
    }
    std::fill(t.begin(), t.end(), 0.0);
    for (int64_t k = 0; k < K; ++k)
      for (int64_t j = 0; j < K; ++j) t[j] += u[k] * (transpose ? h[j * K + k] : h[k * K + j]);
    for (auto& v : t) v /= std::sqrt(static_cast<double>(K));
    if (int8) {  // t on the stored axis, zero padded, quantized per block
      std::fill(tf.begin(), tf.end(), 0.0f);
      for (int64_t j = 0; j < f.n_groups(); ++j)
        for (int64_t k = 0; k < f.group_length(j); ++k)
          tf[f.stored_offset(j) + k] = static_cast<float>(t[j * f.group() + k]);
      for (const KBlock& b : blocks) {
        float peak = 0.0f;
        for (int64_t k = 0; k < b.length; ++k) peak = std::fmax(peak, std::fabs(tf[b.offset + k]));
        const float inv = peak > 0.0f ? 127.0f / peak : 0.0f;
        for (int64_t k = b.offset; k < b.offset + b.length; ++k) {
          const float p = tf[k] * inv;
          q[k] = std::nearbyint(p);
          sa[k] = peak / 127.0f;
          tie[k] = std::fabs(p - std::floor(p) - 0.5f) < 1e-3f;
        }
      }
    }
    for (int64_t n = 0; n < N; ++n) {
      double y = c.bias ? w.bias[n] : 0.0, mag = std::fabs(y), slack = 0.0;
      if (!int8) {
        for (int64_t k = 0; k < K; ++k) {
          y += t[k] * wt[n * K + k];
          mag += std::fabs(t[k] * wt[n * K + k]);
        }
      } else {
        for (int64_t k = 0; k < ks; ++k) {
          const double wk = wt[n * ks + k];
          y += sa[k] * q[k] * wk;
          mag += std::fabs(sa[k] * q[k] * wk);
          if (tie[k]) slack += sa[k] * std::fabs(wk);
        }
      }
      r.y[m * N + n] = y;
      r.slack[m * N + n] = slack;
      r.mag = std::max(r.mag, mag);
    }
  }
  return r;
}

// Largest error of `got` against the reference, and whether every element is within
// 1e-5 * mag (float summation, the transform in float) + slack + 1e-3 |y| (float16 output).
bool WithinReference(const Case& c, const RotatedRef& r, const std::vector<float>& got,
                     double* max_err, double* worst_ratio) {
  bool ok = true;
  *max_err = 0.0;
  *worst_ratio = 0.0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double err = std::fabs(got[i] - r.y[i]);
    const double tol =
        1e-5 * r.mag + r.slack[i] + (c.f16_act ? 1e-3 * std::fabs(r.y[i]) : 0.0) + 1e-6;
    ok = ok && std::isfinite(got[i]) && err <= tol;
    *max_err = std::max(*max_err, err);
    *worst_ratio = std::max(*worst_ratio, err / tol);
  }
  return ok;
}

// Rotated cases: every K of the list, each with all 8 combinations of path, float32 / float16
// activations and input scale, M in {1, 3, 130}; group sizes that divide K, that do not (a
// partial last group, or one group longer than K) and per-channel; every weight kind.
Case RotateCase(int i, std::mt19937& rng) {
  const int64_t Ks[] = {12, 24, 48, 64, 96, 144, 192, 384, 576, 1536};
  const int64_t Ms[] = {1, 3, 130};
  const int64_t Ns[] = {16, 40, 17};
  const int bits_list[] = {2, 3, 4, 5, 6, 8};
  Case c;
  c.rotate = true;
  c.K = Ks[i % 10];
  const int v = (i / 10) % 8;
  c.path = v % 2 ? ComputePath::kInt8 : ComputePath::kFloat;
  c.f16_act = (v / 2) % 2;
  c.input_scale = (v / 4) % 2;
  c.M = Ms[(v + i % 10) % 3];
  c.N = Ns[rng() % 3];
  c.bits = bits_list[rng() % 6];
  c.layout = rng() % 4 == 0 ? Layout::kRow : Layout::kTile16;
  std::vector<int64_t> divide, other;
  for (int64_t g = 16; g <= std::min<int64_t>(2 * c.K, kMaxGroup); g += 16)
    (c.K % g ? other : divide).push_back(g);
  const int kind = static_cast<int>(rng() % 3);
  if (kind == 1 && !divide.empty())
    c.group_size = divide[rng() % divide.size()];
  else if (kind == 2 || (kind == 1 && divide.empty()))
    c.group_size = other[rng() % other.size()];
  else
    c.group_size = 0;
  c.codebook = rng() % 5 == 0;
  c.symmetric = !c.codebook && rng() % 4 == 0;
  c.hierarchical = !c.codebook && !c.symmetric && rng() % 3 == 0;
  c.scale_bits = 2 + static_cast<int>(rng() % 7);
  // float16 output: sub-scales up to 256 on 8-bit codes at K = 1536 can exceed its range
  if (c.f16_act) c.scale_bits = std::min(c.scale_bits, 4);
  c.super_group = 2 + static_cast<int>(rng() % 3);
  c.bias = rng() % 3 == 0;
  c.f16_scales = rng() % 2;
  return c;
}

// A rotated case through the driver with table kt against RotatedReference.
bool CheckRotatedRef(const std::string& name, const KernelTable* kt, const Case& c,
                     std::mt19937& rng) {
  RandomWeight w(c, rng);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> a(static_cast<size_t>(c.M * c.K));
  for (auto& v : a) v = normal(rng);
  const auto got = Run(c, w, kt, a, ThreadedFor(3));
  const RotatedRef r = RotatedReference(c, w, a, false);
  double max_err = 0.0, ratio = 0.0;
  if (WithinReference(c, r, got, &max_err, &ratio)) return true;
  std::printf("FAIL %s: rotated vs dense H_K reference: %s max_err=%g (%.3g x tolerance)\n",
              name.c_str(), Describe(c).c_str(), max_err, ratio);
  return false;
}

// The reference check tells a wrong orientation apart: with H_K^T (H_12 is not symmetric) the
// driver's output is far outside the tolerance; unrotated too.
bool CheckReferenceDiscriminates(std::mt19937& rng, std::string* why) {
  for (int path = 0; path < 2; ++path) {
    Case c;
    c.rotate = true;
    c.M = 3;
    c.K = 144;
    c.N = 40;
    c.bits = 3;
    c.group_size = 48;
    c.layout = Layout::kTile16;
    c.path = path ? ComputePath::kInt8 : ComputePath::kFloat;
    c.symmetric = c.hierarchical = c.codebook = c.input_scale = c.bias = c.f16_act = false;
    c.f16_scales = true;
    RandomWeight w(c, rng);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::vector<float> a(static_cast<size_t>(c.M * c.K));
    for (auto& v : a) v = normal(rng);
    const auto got = Run(c, w, RefKernels(), a, SerialFor());
    double max_err = 0.0, ratio = 0.0;
    if (!WithinReference(c, RotatedReference(c, w, a, false), got, &max_err, &ratio)) {
      *why = "rotated case outside its reference";
      return false;
    }
    if (WithinReference(c, RotatedReference(c, w, a, true), got, &max_err, &ratio) ||
        ratio < 100.0) {
      *why = "a reference with H_K^T is not told apart (" + std::to_string(ratio) + " x tol)";
      return false;
    }
    c.rotate = false;
    const auto plain = Run(c, w, RefKernels(), a, SerialFor());
    if (WithinReference(c, RotatedReference(c, w, a, false), plain, &max_err, &ratio) ||
        ratio < 100.0) {
      *why = "an unrotated run is not told apart (" + std::to_string(ratio) + " x tol)";
      return false;
    }
  }
  return true;
}

// rotate = 0 is the driver as it was before rotation existed: RunMatMul against the steps it
// took (each group copied or converted, then scaled, zero padded; quantize_activations on the
// int8 path; the table's matmul over every tile and row; float16 output rounded), bit for bit.
bool CheckUnrotatedUnchanged(const std::string& name, const KernelTable* kt, std::mt19937& rng) {
  const int64_t Ms[] = {1, 3, 130};
  bool ok = true;
  for (int trial = 0; trial < 24; ++trial) {
    Case c = ExtraCase(trial, rng);
    c.M = Ms[trial % 3];
    c.K = std::min<int64_t>(c.K, 600);
    c.input_scale = trial / 3 % 2;
    c.f16_act = trial / 6 % 2;
    c.rotate = false;
    RandomWeight w(c, rng);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::vector<float> a(static_cast<size_t>(c.M * c.K));
    for (auto& v : a) v = normal(rng);
    const auto got = Run(c, w, kt, a, SerialFor());

    const WeightView view = w.View(c.f16_scales);
    const WeightFormat& f = view.fmt;
    const std::vector<KBlock> blocks = MakeKBlocks(f, kActBlockMax);
    const int64_t lda = f.k_stored() + 64, nb = static_cast<int64_t>(blocks.size());
    std::vector<float> a_pad(static_cast<size_t>(c.M * lda), 0.0f);
    for (int64_t m = 0; m < c.M; ++m)
      for (int64_t j = 0; j < f.n_groups(); ++j) {
        const int64_t src = j * f.group(), len = f.group_length(j);
        float* dst = a_pad.data() + m * lda + f.stored_offset(j);
        for (int64_t k = 0; k < len; ++k) {
          const float v = a[m * c.K + src + k];
          dst[k] = c.f16_act ? HalfToFloat(FloatToHalf(v)) : v;
        }
        if (c.input_scale)
          for (int64_t k = 0; k < len; ++k) dst[k] *= w.input_scale[src + k];
      }
    std::vector<int8_t> a8(a_pad.size());
    std::vector<float> sa(static_cast<size_t>(c.M * nb));
    std::vector<int32_t> su(sa.size());
    MatMulArgs args;
    args.w = &view;
    args.blocks = blocks.data();
    args.n_blocks = nb;
    args.path = c.path;
    args.M = c.M;
    args.a_f32 = a_pad.data();
    args.lda = lda;
    if (c.path == ComputePath::kInt8) {
      kt->quantize_activations(a_pad.data(), c.M, lda, blocks.data(), nb, a8.data(), sa.data(),
                               su.data());
      args.a_i8 = a8.data();
      args.a_scale = sa.data();
      args.a_sum = su.data();
    }
    std::vector<float> before(static_cast<size_t>(c.M * c.N), NAN);
    args.y = before.data();
    args.ldy = c.N;
    args.bias = w.bias.empty() ? nullptr : w.bias.data();
    kt->matmul(args, 0, f.n_tiles(), 0, c.M);
    if (c.f16_act)
      for (auto& v : before) v = HalfToFloat(FloatToHalf(v));
    if (std::memcmp(before.data(), got.data(), got.size() * sizeof(float))) {
      std::printf("FAIL %s: rotate = 0 not bit-identical to the unrotated driver: %s\n",
                  name.c_str(), Describe(c).c_str());
      ok = false;
    }
  }
  return ok;
}

// QxMultiMatMul with rotate = [1, 0] (and [0, 1]): a rotated and an unrotated weight of one
// input in one RunMatMuls call give each what RunMatMul gives alone, bit for bit.
bool CheckRotatedMulti(const std::string& name, const KernelTable* kt, std::mt19937& rng) {
  const int64_t Ks[] = {96, 576, 144, 24};
  const int64_t Ms[] = {1, 130, 3, 5};
  bool ok = true;
  for (int trial = 0; trial < 4; ++trial) {
    Case c[2];
    for (int i = 0; i < 2; ++i) {
      c[i] = RotateCase(trial, rng);
      c[i].K = Ks[trial];
      c[i].M = Ms[trial];
      c[i].path = trial % 2 ? ComputePath::kInt8 : ComputePath::kFloat;  // one per node
      c[i].f16_act = trial / 2 % 2;
      c[i].rotate = (i + trial) % 2 == 0;
    }
    RandomWeight w0(c[0], rng), w1(c[1], rng);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::vector<float> a(static_cast<size_t>(c[0].M * c[0].K));
    for (auto& v : a) v = normal(rng);
    const ParallelFor pf = ThreadedFor(3);
    const auto y0 = Run(c[0], w0, kt, a, pf), y1 = Run(c[1], w1, kt, a, pf);
    const MatMulPlan p0 = TestPlan(c[0], w0, kt), p1 = TestPlan(c[1], w1, kt);
    const MatMulPlan* plans[2] = {&p0, &p1};
    std::vector<float> z0(y0.size(), NAN), z1(y1.size(), NAN);
    if (c[0].f16_act) {
      std::vector<uint16_t> a16(a.size()), z16_0(z0.size()), z16_1(z1.size());
      for (size_t i = 0; i < a.size(); ++i) a16[i] = FloatToHalf(a[i]);
      void* ys[2] = {z16_0.data(), z16_1.data()};
      RunMatMuls(plans, 2, a16.data(), ElemType::kFloat16, c[0].M, ys, pf);
      for (size_t i = 0; i < z0.size(); ++i) z0[i] = HalfToFloat(z16_0[i]);
      for (size_t i = 0; i < z1.size(); ++i) z1[i] = HalfToFloat(z16_1[i]);
    } else {
      void* ys[2] = {z0.data(), z1.data()};
      RunMatMuls(plans, 2, a.data(), ElemType::kFloat32, c[0].M, ys, pf);
    }
    if (std::memcmp(y0.data(), z0.data(), y0.size() * sizeof(float)) ||
        std::memcmp(y1.data(), z1.data(), y1.size() * sizeof(float))) {
      std::printf("FAIL %s: RunMatMuls of a rotated and an unrotated weight differs from "
                  "RunMatMul: %s / %s\n",
                  name.c_str(), Describe(c[0]).c_str(), Describe(c[1]).c_str());
      ok = false;
    }
  }
  return ok;
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
  // The rotation tests draw from their own stream: the other cases stay what they were.
  std::mt19937 rot_rng(seed + 1);
  {
    std::string why;
    for (int check = 0; check < 3; ++check) {
      const bool ok = check == 0   ? CheckHadamardDefinitions(&why)
                      : check == 1 ? CheckHadamardTransform(rot_rng, &why)
                                   : CheckReferenceDiscriminates(rot_rng, &why);
      if (ok) ++passed;
      else {
        std::printf("FAIL rotation: %s\n", why.c_str());
        ++failed;
      }
    }
  }
  const int64_t Ms[] = {1, 2, 3, 7, 64, 129};
  const int64_t Ns[] = {1, 7, 64, 4097, 33};
  const int bits_list[] = {2, 3, 4, 5, 6, 8};
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
    if (CheckTableHadamard(kt, rot_rng, &why)) ++passed;
    else {
      std::printf("FAIL %s: %s\n", name.c_str(), why.c_str());
      ++failed;
    }
    if (CheckDecodeAttention(kt, rot_rng, &why)) ++passed;
    else {
      std::printf("FAIL %s: %s\n", name.c_str(), why.c_str());
      ++failed;
    }
    for (int i = 0; i < cases; ++i) {
      Case c;
      c.M = Ms[i % 6];
      c.N = Ns[(i / 6) % 5];
      c.bits = bits_list[(i / 30) % 6];
      c.path = (i / 180) % 2 ? ComputePath::kInt8 : ComputePath::kFloat;
      c.layout = (i / 360) % 2 ? Layout::kRow : Layout::kTile16;
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
      const double tol = RelativeTolerance(c) * std::max(max_ref, 1e-3) + 1e-6;
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
    for (int i = 0; i < 288; ++i) {
      if (CheckCase(name, kt, ExtremeCase(i, rng), rng)) ++passed;
      else ++failed;
    }
    for (int i = 0; i < 96; ++i) {
      if (CheckCase(name, kt, LongKCase(i, rng), rng)) ++passed;
      else ++failed;
    }
    // Rotation (rotate = 1): against the reference table, as every case above, and against the
    // dense H_K reference; rotate = 0 bit-identical to the driver before rotation.
    for (int i = 0; i < 80; ++i) {
      if (CheckCase(name, kt, RotateCase(i, rot_rng), rot_rng)) ++passed;
      else ++failed;
    }
    for (int i = 0; i < 80; ++i) {
      if (CheckRotatedRef(name, kt, RotateCase(i, rot_rng), rot_rng)) ++passed;
      else ++failed;
    }
    if (CheckUnrotatedUnchanged(name, kt, rot_rng)) ++passed;
    else ++failed;
    if (CheckRotatedMulti(name, kt, rot_rng)) ++passed;
    else ++failed;
  }
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed ? 1 : 0;
}
