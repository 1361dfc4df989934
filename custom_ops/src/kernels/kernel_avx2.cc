// avx2 kernels (not yet implemented: the table is absent and dispatch falls back).
#include "quantx/kernels.h"

namespace quantx {
const KernelTable* Avx2Kernels() { return nullptr; }
}  // namespace quantx
