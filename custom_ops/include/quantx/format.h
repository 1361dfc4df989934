// QuantX weight format: sizes and validation (C++ mirror of quantx_onnx/format.py).
// docs/FORMAT.md is the specification; the numpy reference is its executable form.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace quantx {

enum class Layout : int { kRow = 0, kTile16 = 1 };
enum class ComputePath : int { kFloat = 0, kInt8 = 4 };

constexpr int kKAlign = 16;     // stored groups are padded to a multiple of 16 k
constexpr int kTileN = 16;      // columns per TILE16 tile
constexpr int kMaxGroup = 4096;
constexpr int kActBlockMax = 128;  // int8 path: activation quantization block (within a group)

inline int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t RoundUp(int64_t a, int64_t b) { return CeilDiv(a, b) * b; }

// The node attributes that define a packed weight W[K, N].
struct WeightFormat {
  int64_t K = 0;
  int64_t N = 0;
  int bits = 0;
  int64_t group_size = 0;  // 0: per-channel
  Layout layout = Layout::kRow;
  int scale_bits = 0;   // >0: hierarchical scales
  int super_group = 0;  // groups per super-scale

  // Returns an empty string when valid, else what is wrong.
  std::string Validate() const;

  int64_t group() const { return group_size ? group_size : K; }
  int64_t n_groups() const { return CeilDiv(K, group()); }
  int64_t n_super() const { return scale_bits ? CeilDiv(n_groups(), super_group) : 0; }
  int64_t n_tiles() const { return CeilDiv(N, kTileN); }
  int64_t group_length(int64_t j) const {
    int64_t rest = K - j * group();
    return rest < group() ? rest : group();
  }
  int64_t stored_length(int64_t j) const { return RoundUp(group_length(j), kKAlign); }
  int64_t stored_group_stride() const { return RoundUp(group(), kKAlign); }
  // Offset of group j in the padded ("stored") k axis.
  int64_t stored_offset(int64_t j) const { return j * stored_group_stride(); }
  int64_t k_stored() const {
    return stored_offset(n_groups() - 1) + stored_length(n_groups() - 1);
  }
  int levels() const { return 1 << bits; }
  // Bytes of one TILE16 super-block (16 columns x 16 k).
  int superblock_bytes() const { return 32 * bits; }
};

// Expected shapes of the packed tensors (same rules as WeightFormat.shapes() in Python).
struct PackedShapes {
  std::vector<int64_t> B, scales, zero_points, sub_scales;
};
PackedShapes ExpectedShapes(const WeightFormat& f);

// One activation block of the int8 path (or one group of the float path): a k range of the
// stored axis that lies inside one weight group.
struct KBlock {
  int64_t group;   // weight group index
  int64_t offset;  // start on the stored k axis
  int64_t length;  // multiple of 16
};
std::vector<KBlock> MakeKBlocks(const WeightFormat& f, int64_t max_block);

// LSB-first bit stream reader used for zero points and sub-scales (and ROW codes).
inline uint32_t ReadBits(const uint8_t* stream, int64_t index, int bits) {
  int64_t bit = index * bits;
  const uint8_t* p = stream + (bit >> 3);
  int shift = static_cast<int>(bit & 7);
  uint32_t v = p[0] >> shift;
  int have = 8 - shift;
  if (have < bits) v |= static_cast<uint32_t>(p[1]) << have;
  return v & ((1u << bits) - 1u);
}

}  // namespace quantx
