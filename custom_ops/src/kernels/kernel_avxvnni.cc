// AVX-VNNI kernels (VEX-encoded vpdpbusd on ymm: Alder Lake and later Intel cores,
// Sapphire Rapids, Zen 5):
// the AVX2 kernels of kernel_avx2.cc compiled again with -mavxvnni and QX_AVX_VNNI, which turns
// each u8 x s8 dot product (vpmaddubsw + vpmaddwd) into one vpdpbusd accumulating in int32.
// Everything else (unpacking, float path, activation quantization) is the AVX2 code.
#define QX_AVX_VNNI 1
#include "kernel_avx2.cc"
