// neon_dot kernels (not yet implemented: the table is absent and dispatch falls back).
#include "quantx/kernels.h"

namespace quantx {
const KernelTable* NeonDotKernels() { return nullptr; }
}  // namespace quantx
