// H_12 (Paley, q = 11; quantx/hadamard.h states it) as compile-time tables, shared by the
// reference transform (hadamard.cc) and the ISA files' vector transform
// (kernels/hadamard_simd.h): with the entries known to the compiler, the unrolled 12-point
// passes compile to additions and subtractions.
#pragma once

#include <cstdint>

namespace quantx {
namespace h12 {

struct Table {
  int v[12][12];
};

constexpr int Chi11(int x) {  // the quadratic character mod 11 (residues 1, 3, 4, 5, 9)
  x = ((x % 11) + 11) % 11;
  return x == 0 ? 0 : (x == 1 || x == 3 || x == 4 || x == 5 || x == 9) ? 1 : -1;
}

constexpr Table Make() {
  Table t{};
  for (int i = 0; i < 12; ++i)
    for (int j = 0; j < 12; ++j) {
      // S[0][j] = 1 (j > 0), S[i][0] = -1 (i > 0), S[1 + i'][1 + j'] = chi(j' - i').
      const int s = i == 0 ? (j ? 1 : 0) : j == 0 ? -1 : Chi11(j - i);
      t.v[i][j] = (i == j ? 1 : 0) + s;
    }
  return t;
}

constexpr Table Transposed(const Table& h) {
  Table t{};
  for (int i = 0; i < 12; ++i)
    for (int j = 0; j < 12; ++j) t.v[i][j] = h.v[j][i];
  return t;
}

inline constexpr Table kH = Make();
inline constexpr Table kHT = Transposed(kH);  // H_12^T, for the inverse of the transform

// Splits K = 12^a * 2^b (unique: a is the power of 3 in K); false if K has another form.
constexpr bool Factor(int64_t K, int* a, int64_t* pow2) {
  if (K < 1) return false;
  int n12 = 0;
  while (K % 12 == 0) {
    K /= 12;
    ++n12;
  }
  if (K & (K - 1)) return false;  // a factor 3 left without its 4, or another prime
  *a = n12;
  *pow2 = K;
  return true;
}

}  // namespace h12
}  // namespace quantx
