// Portable pieces every kernel table may reuse.
#pragma once

#include "quantx/kernels.h"

namespace quantx {

// Reference activation quantization (see QuantizeActFn).
void QuantizeActivationsPortable(const float* a, int64_t M, int64_t lda, const KBlock* blocks,
                                 int64_t n_blocks, int8_t* q, float* scale, int32_t* sum);

// Writes acc[c] + bias for the valid columns of `tile` into row m of Y.
void StoreTileRow(const MatMulArgs& args, int64_t m, int64_t tile, const float* acc);

}  // namespace quantx
