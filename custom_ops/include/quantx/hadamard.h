// Randomized Hadamard rotation of the activations (attribute rotate = 1 of QxMatMul and
// QxMultiMatMul; QxGather un-rotates its rows instead). A weight W[K, N] stored in a rotated
// input basis is applied as
//
//     t = (a * d) @ H_K / sqrt(K)      (a: one activation row, input_scale already applied;
//     Y = t @ W'                        * elementwise; W': what the packed weight decodes to)
//
// - d[k] in {+1, -1} from xorshift32: s = 0x2545F491; for each k in 0..K-1 in turn,
//   s ^= s << 13; s ^= s >> 17; s ^= s << 5; d[k] = (s >> 31) ? -1 : +1 (the state is updated
//   before each k's sign is read).
// - H_K = H_12 (x) ... (x) H_12 (a factors) (x) H_2 (x) ... (x) H_2 (b factors), K = 12^a * 2^b,
//   Kronecker products with the first factor most significant in the row-major index. x @ H_K
//   applies each factor along its own axis of x reshaped to [12, ..., 12, 2, ..., 2]:
//   y[.., j, ..] = sum_i x[.., i, ..] * H_m[i, j] (a contraction over H's row index: H_12 is not
//   symmetric).
// - H_2 = [[1, 1], [1, -1]].
// - H_12 (Paley, q = 11) = I_12 + S: S[0][j] = 1 (j = 1..11), S[i][0] = -1 (i = 1..11),
//   S[1 + i][1 + j] = chi((j - i) mod 11) (i, j = 0..10), chi(0) = 0, chi = +1 on the quadratic
//   residues {1, 3, 4, 5, 9} mod 11, -1 otherwise. H_12 @ H_12^T = 12 I.
// The numpy reference (quantx_onnx) builds the same H_K as a dense matrix; this is the fast form.
#pragma once

#include <cstdint>
#include <vector>

namespace quantx {

// True if K = 12^a * 2^b for some a, b >= 0 (K = 1, 2, 4, ..., 12, 24, ..., 144, ...).
bool IsHadamardSize(int64_t K);

// Entry [i][j] (0 <= i, j < 12) of H_12, +1 or -1.
int Hadamard12(int i, int j);

// The signs d[0..K-1] (+1.0f or -1.0f).
std::vector<float> HadamardSigns(int64_t K);

// x[0..K-1] <- x @ H_K / sqrt(K), in place (no signs: multiply by d first). K must satisfy
// IsHadamardSize. Factors of 12 are dense 12 x 12 passes, factors of 2 butterflies; the
// 1 / sqrt(K) is one final pass. transposed: x @ H_K^T / sqrt(K) instead, which followed by
// x * d is x @ Q^T, the inverse rotation (QxGather's rows of a rotated table).
void HadamardTransform(float* x, int64_t K, bool transposed = false);

}  // namespace quantx
