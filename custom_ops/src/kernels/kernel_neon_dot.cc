// "neon-dotprod" kernels: ARMv8.2-A + dotprod (Cortex-A55/A75 and later, Neoverse, Apple M).
// CMake compiles this file with -march=armv8.2-a+dotprod; dispatch only selects it when
// HWCAP_ASIMDDP is set. The code is shared with kernel_neon.cc through neon_common.h (see that
// file for the unpacking and the float path); this file picks the sdot policy.
//
// Why sdot suits TILE16: the layout stores code (c, k) of k4-step s = k / 4 at lane 4c + k % 4,
// which is exactly the operand order of `sdot vacc.4s, vw.16b, va.4b[s]`: int32 lane c of the
// accumulator gets the dot product of the 4 consecutive k of column c (bytes 4c..4c+3 of the
// code register) with the 4 activations of step s, taken by element from the register that
// holds the 16 activations of the super-block. So:
//  - one 16-byte quarter of a 64-byte plane = one q-register = 4 columns x 4 k; a 16-column
//    tile is 4 sdot per k4-step and row, into 4 int32x4 accumulators (4 columns each);
//  - activations are loaded once per 16 k (one q-register per row) and never shuffled or
//    replicated;
//  - unpacked codes feed sdot straight from registers: 2- to 6-bit codes (< 64) as signed
//    bytes, 8-bit codes eor 0x80 with the -128 folded into the zero term (exact in int32);
//  - decode (M <= 4): all rows share each unpacked quarter (up to 16 accumulators); one-row
//    decode splits even/odd steps over two accumulators per quarter (8 independent sdot
//    chains). Prefill: (tile, k-block) unpacked once into an L1 buffer in the same lane order,
//    then a 4-row x 16-column micro-kernel (16 accumulators, 4 code loads per k4-step).
#include "quantx/kernels.h"

#if defined(__aarch64__)

#define QX_NEON_NS neon_dot
#include "neon_common.h"

#if !defined(__ARM_FEATURE_DOTPROD)
#error "kernel_neon_dot.cc must be compiled with dotprod enabled (-march=armv8.2-a+dotprod)"
#endif

namespace quantx {
namespace {
const KernelTable kNeonDot = {"neon-dotprod", neon_dot::MatMul<neon_dot::DotProd>,
                              neon_dot::QuantizeActivations, neon_dot::IsNative,
                              neon_dot::StreamRead};
}  // namespace

const KernelTable* NeonDotKernels() { return &kNeonDot; }
}  // namespace quantx

#else  // not aarch64: the table is absent

namespace quantx {
const KernelTable* NeonDotKernels() { return nullptr; }
}  // namespace quantx

#endif
