// The CPU GEMM unit of the reward heads: run-time SIMD dispatch (AVX2+FMA+F16C on x86-64, portable
// loops elsewhere), operand packing and the register-blocked 6 x 16 micro-kernel. Internal to
// csrc/cpu/.
#pragma once

#include <cstdint>

namespace furl_fast::cpu {

constexpr int kMR = 6;   // micro-kernel rows
constexpr int kNR = 16;  // micro-kernel columns (two 8-float vectors)
constexpr int64_t kKc = 256;       // depth slice: a 256 x 16 w1 slice (16 KiB) stays in L1

// C[6 x 16] (row stride ldc) = (accumulate ? C : 0) + sum over k < depth of A[k][0..6] (x) B[k][0..16]
// with A packed ([k][6]) and B read in place with row stride ldb.
using MicroKernel = void (*)(int64_t depth, const float* a, const float* b, int64_t ldb, float* c,
                             int64_t ldc, bool accumulate);
// out[r] = sum_i x[r][i] * t[i] for the 4 rows x[0..3].
using Dots4 = void (*)(const float* const* x, const float* t, int64_t n, float* out);
using Dot1 = float (*)(const float* a, const float* b, int64_t n);
using HalfToFloat = void (*)(const uint16_t* src, float* dst, int64_t n);

struct Simd {
  MicroKernel micro_kernel;
  Dots4 dots4;
  Dot1 dot1;
  HalfToFloat half_to_float;
};

// The fastest kernels this CPU supports, chosen once.
const Simd& simd();

// The right-hand operand of a GEMM, a row-major (depth, cols) float matrix, packed into panels of
// 16 columns ([panel][k][16], zero-padded past cols) so the micro-kernel reads it contiguously.
// Read in place instead, rows 4 KiB apart (w1 with H = 1024) would all map to a few L1 sets and
// evict each other.
struct RightOperand {
  const float* data;
  int64_t depth, cols;
  int64_t panels() const { return (cols + kNR - 1) / kNR; }
};

// Packs panel j of a (depth, cols) matrix into dst[j * depth * kNR ...].
void pack_panel(const float* m, int64_t depth, int64_t cols, int64_t j, float* dst);
// Rows per block for n rows on `threads` workers: a multiple of kMR, about 8 micro-panels (48 rows),
// but small enough that every worker gets at least 4 blocks. A helper thread may start late or be
// preempted on a busy machine; with small blocks the other workers take over its share and the
// wait for its last block is short.
int64_t row_block_for(int64_t n, int threads);
// Packs rows [0, rows) of a float (rows, depth) matrix with row stride ld into micro-panels of
// kMR rows ([k][kMR], zero rows past `rows`); dst holds ceil(rows / kMR) * kMR * depth floats.
void pack_rows(const float* src, int64_t rows, int64_t depth, int64_t ld, float* dst);
// C (row_panels * kMR, b.panels() * kNR), row stride ldc = A (packed rows, depth) @ B.
void gemm(const float* a, int64_t row_panels, const RightOperand& b, float* c, int64_t ldc);

}  // namespace furl_fast::cpu
