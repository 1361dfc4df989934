// Portable decoding of packed weights, shared by the reference kernel, by every ISA's fallback
// for layouts it does not read natively, and by QxGather. Plain C++: the behaviour here is the
// C++ statement of docs/FORMAT.md.
#pragma once

#include <cstdint>

#include "quantx/kernels.h"

namespace quantx {

float HalfToFloat(uint16_t h);
uint16_t FloatToHalf(float f);

// Code of column n at stored position ks (which lies in group `group`).
uint32_t CodeAt(const WeightView& w, int64_t n, int64_t group, int64_t ks);

// Codes of column tile `tile` on stored k range [b.offset, b.offset + b.length), in k-major
// order: codes[k * 16 + c]. Columns past N decode as 0. Blocks are at most kActBlockMax long
// (true of every block the kernels are given, and required by every helper here).
void DecodeTileCodes(const WeightView& w, int64_t tile, const KBlock& b, uint8_t* codes);

// Effective scale and zero of group `group` for the 16 columns of `tile`. zero is the integer
// zero point as float (2^(bits-1) if symmetric) and 0 for codebook weights. Columns past N
// get scale 0.
void DecodeGroupParams(const WeightView& w, int64_t tile, int64_t group, float* scale,
                       float* zero);

// Dequantized weights of the tile on block b: out[k * 16 + c] = scale * (code - zero), or
// scale * codebook[row][code].
void DequantTileF32(const WeightView& w, int64_t tile, const KBlock& b, float* out);

// Int8-path operands of the tile on block b: u8 values in vpdpbusd lane order
// (out[(k / 4) * 64 + c * 4 + k % 4]) and per-column scale and zero such that the weight is
// scale * (value - zero). Uniform grids: value = code. Codebooks: value = codebook_i8 + 128,
// zero = 128, scale = group scale * codebook_i8_scale.
void UnpackTileU8(const WeightView& w, int64_t tile, const KBlock& b, uint8_t* out,
                  float* scale, float* zero);

// Column n of W over all K (the embedding row n for QxGather), input_scale not applied.
void DequantColumn(const WeightView& w, int64_t n, float* out);

}  // namespace quantx
