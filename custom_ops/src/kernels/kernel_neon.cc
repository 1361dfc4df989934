// neon kernels (not yet implemented: the table is absent and dispatch falls back).
#include "quantx/kernels.h"

namespace quantx {
const KernelTable* NeonKernels() { return nullptr; }
}  // namespace quantx
