// avx512 kernels (not yet implemented: the table is absent and dispatch falls back).
#include "quantx/kernels.h"

namespace quantx {
const KernelTable* Avx512Kernels() { return nullptr; }
}  // namespace quantx
