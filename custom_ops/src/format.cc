#include "quantx/format.h"

#include <sstream>

namespace quantx {

std::string WeightFormat::Validate() const {
  std::ostringstream err;
  if (K < 1 || N < 1) {
    err << "K and N must be >= 1, got K=" << K << " N=" << N;
  } else if (K > (int64_t{1} << 31) || N > (int64_t{1} << 31)) {
    err << "K and N must be < 2^31, got K=" << K << " N=" << N;
  } else if (bits < 2 || bits > 8 || bits == 7) {
    err << "bits must be 2, 3, 4, 5, 6 or 8, got " << bits;
  } else if (group_size != 0 &&
             (group_size % kKAlign != 0 || group_size < kKAlign || group_size > kMaxGroup)) {
    err << "group_size must be 0 (per-channel) or a multiple of 16 in [16, 4096], got "
        << group_size;
  } else if (layout != Layout::kRow && layout != Layout::kTile16) {
    err << "layout must be 0 (row) or 1 (tile16), got " << static_cast<int>(layout);
  } else if (scale_bits != 0 && (scale_bits < 2 || scale_bits > 8)) {
    err << "scale_bits must be 0 or in [2, 8], got " << scale_bits;
  } else if (scale_bits != 0 && super_group < 2) {
    err << "hierarchical scales need super_group >= 2, got " << super_group;
  } else if (scale_bits == 0 && super_group != 0) {
    err << "super_group is only meaningful with scale_bits > 0";
  }
  return err.str();
}

PackedShapes ExpectedShapes(const WeightFormat& f) {
  PackedShapes s;
  const int64_t G = f.n_groups();
  const int64_t n_scales = f.scale_bits ? f.n_super() : G;
  if (f.layout == Layout::kRow) {
    s.B = {f.N, G, f.stored_group_stride() * f.bits / 8};
    s.scales = {f.N, n_scales};
    s.zero_points = {f.N, CeilDiv(G * f.bits, 8)};
    if (f.scale_bits) s.sub_scales = {f.N, CeilDiv(G * f.scale_bits, 8)};
  } else {
    const int64_t T = f.n_tiles();
    s.B = {T, f.k_stored() / kKAlign, f.superblock_bytes()};
    s.scales = {T, n_scales, kTileN};
    s.zero_points = {T, G, 2 * static_cast<int64_t>(f.bits)};
    if (f.scale_bits) s.sub_scales = {T, G, 2 * static_cast<int64_t>(f.scale_bits)};
  }
  return s;
}

std::vector<KBlock> MakeKBlocks(const WeightFormat& f, int64_t max_block) {
  std::vector<KBlock> blocks;
  for (int64_t j = 0; j < f.n_groups(); ++j) {
    const int64_t start = f.stored_offset(j), len = f.stored_length(j);
    for (int64_t o = 0; o < len; o += max_block) {
      const int64_t l = len - o < max_block ? len - o : max_block;
      blocks.push_back({j, start + o, l});
    }
  }
  return blocks;
}

}  // namespace quantx
