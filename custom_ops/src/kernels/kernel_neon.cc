// "neon" kernels: ARMv8.0-A Advanced SIMD, no dot-product instructions (Cortex-A53/A57/A72/
// A73, ...). The code is shared with kernel_neon_dot.cc through neon_common.h; this file picks
// the smull / sadalp policy.
//
// Why these instructions suit TILE16 (16 columns x 16 k per super-block; code (c, k) of k4-step
// s = k / 4 at lane 4c + k % 4):
//  - A 128-bit register holds 16 lanes = 4 columns x 4 k, so each 16-byte quarter of a 64-byte
//    plane block is one q-register: 4 of them cover a 16-column tile for one k4-step, and one
//    int32x4 accumulator per quarter and row holds 4 output columns. No shuffles of codes or
//    activations are needed to line columns up with lanes.
//  - Unpacking is in-lane: 2-bit: ushr #2s + and #3 (the 4 k4-steps of a super-block are the
//    four 2-bit fields of the same byte); 3-bit: the same low plane, and the 2 high-bit bytes
//    of a (step, quarter) broadcast over 8 lanes each with tbl, cmtst against
//    {1, 2, ..., 128} and bsl into bit 2; 4-bit: and #15 / ushr #4 of the two nibble planes;
//    5-bit: those nibbles plus bit 4 from its masks as 3-bit's high bit (tbl, cmtst, ushr #3
//    to 0x1f, then bsl / sri insert the nibble); 6-bit: the nibbles plus bits 4-5 from a
//    2-bit plane (and #0x33 splits its 4 fields into two registers, sli / sri / bsl insert
//    them); 8-bit: the plane itself. Codes of <= 6 bits are < 64 and act as signed bytes
//    directly; 8-bit codes are eor'ed with 0x80 (code - 128) and the shift is folded into the
//    zero term: sum (q - z) a = sum (q - 128) a - (z - 128) sum(a), all exact in int32.
//  - Int8 path without sdot: the 4 activations of step s are replicated into every int32 lane
//    (dup .s[s]); smull / smull2 with the code register give 16 int16 products (4 columns x 4
//    k); addp folds k pairs to [c0 c0 c1 c1 c2 c2 c3 c3] and sadalp folds the rest into one
//    int32x4 [c0 c1 c2 c3] -- the accumulator shape of sdot, so the per-block epilogue
//    (scale * sa * (dot - zero * sum(a))) is shared with the dotprod table. |code - 128| * 127
//    fits int16 twice; for codes <= 4 bits a whole super-block (4 steps) is accumulated with
//    smlal before one addp + sadalp (4 * 2 * 15 * 127 < 2^15), for 5/6-bit codes two steps
//    (2 * 2 * 63 * 127 = 32004 < 2^15).
//  - Float path: one tbl2 per 4 outputs, from the code register and a constant {0x00, 0x4b}
//    register, transposes a 4 x 4 block to [k][column] order and widens it into the fp32 bit
//    pattern of 2^23 + code; fsub of 2^23 + zero gives code - zero exactly, and fmla by element
//    with the 4 activations of the step accumulates 4 columns per instruction.
//  - Decode (M <= 4): each super-block is loaded once and unpacked in registers for all rows;
//    the int8 path runs at most 2 rows per pass here (register budget of smull/sadalp).
//    Prefill: each (tile, k-block) is unpacked once into an L1 buffer (int8 in the same lane
//    order, or scaled fp32 [k][16]) and reused by every row through register-blocked
//    micro-kernels (2 x 16 int8, 4 x 16 fp32).
#include "quantx/kernels.h"

#if defined(__aarch64__)

#define QX_NEON_NS neon_base
#include "neon_common.h"

namespace quantx {
namespace {
const KernelTable kNeon = {"neon", neon_base::MatMul<neon_base::NoDotProd>,
                           neon_base::QuantizeActivations, neon_base::IsNative,
                           neon_base::StreamRead};
}  // namespace

const KernelTable* NeonKernels() { return &kNeon; }
}  // namespace quantx

#else  // not aarch64: the table is absent

namespace quantx {
const KernelTable* NeonKernels() { return nullptr; }
}  // namespace quantx

#endif
