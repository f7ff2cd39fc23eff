// The CPU GEMM unit (see gemm.h): SIMD micro-kernels, dispatch, packing, gemm.
#include "gemm.h"

#include <algorithm>
#include <cstring>

#include "furl_fast/half.h"

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define FURL_FAST_X86_SIMD 1
#include <immintrin.h>
#endif

namespace furl_fast::cpu {
namespace {

void micro_kernel_generic(int64_t depth, const float* a, const float* b, int64_t ldb, float* c,
                          int64_t ldc, bool accumulate) {
  float acc[kMR][kNR];
  for (int i = 0; i < kMR; ++i)
    for (int j = 0; j < kNR; ++j) acc[i][j] = accumulate ? c[i * ldc + j] : 0.f;
  for (int64_t k = 0; k < depth; ++k, a += kMR, b += ldb)
    for (int i = 0; i < kMR; ++i)
      for (int j = 0; j < kNR; ++j) acc[i][j] += a[i] * b[j];
  for (int i = 0; i < kMR; ++i)
    for (int j = 0; j < kNR; ++j) c[i * ldc + j] = acc[i][j];
}

// 8 independent partial sums per row: float addition is not associative, so compilers only
// vectorise a reduction written with explicit lanes.
void dots4_generic(const float* const* x, const float* t, int64_t n, float* out) {
  for (int r = 0; r < 4; ++r) {
    float lanes[8] = {};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
      for (int l = 0; l < 8; ++l) lanes[l] += x[r][i + l] * t[i + l];
    float s = 0.f;
    for (; i < n; ++i) s += x[r][i] * t[i];
    for (int l = 0; l < 8; ++l) s += lanes[l];
    out[r] = s;
  }
}

float dot1_generic(const float* a, const float* b, int64_t n) {
  float lanes[8] = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int l = 0; l < 8; ++l) lanes[l] += a[i + l] * b[i + l];
  float s = 0.f;
  for (; i < n; ++i) s += a[i] * b[i];
  for (int l = 0; l < 8; ++l) s += lanes[l];
  return s;
}

void half_to_float_generic(const uint16_t* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = half_bits_to_float(src[i]);
}

#ifdef FURL_FAST_X86_SIMD
#define FURL_AVX2 __attribute__((target("avx2,fma,f16c")))

FURL_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// 12 accumulators + 2 B vectors + 1 broadcast = 15 of the 16 ymm registers.
FURL_AVX2 void micro_kernel_avx2(int64_t depth, const float* a, const float* b, int64_t ldb,
                                 float* c, int64_t ldc, bool accumulate) {
  __m256 c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51;
  if (accumulate) {
    c00 = _mm256_loadu_ps(c + 0 * ldc); c01 = _mm256_loadu_ps(c + 0 * ldc + 8);
    c10 = _mm256_loadu_ps(c + 1 * ldc); c11 = _mm256_loadu_ps(c + 1 * ldc + 8);
    c20 = _mm256_loadu_ps(c + 2 * ldc); c21 = _mm256_loadu_ps(c + 2 * ldc + 8);
    c30 = _mm256_loadu_ps(c + 3 * ldc); c31 = _mm256_loadu_ps(c + 3 * ldc + 8);
    c40 = _mm256_loadu_ps(c + 4 * ldc); c41 = _mm256_loadu_ps(c + 4 * ldc + 8);
    c50 = _mm256_loadu_ps(c + 5 * ldc); c51 = _mm256_loadu_ps(c + 5 * ldc + 8);
  } else {
    c00 = c01 = c10 = c11 = c20 = c21 = c30 = c31 = c40 = c41 = c50 = c51 = _mm256_setzero_ps();
  }
#pragma GCC unroll 4
  for (int64_t k = 0; k < depth; ++k, a += kMR, b += ldb) {
    const __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
    __m256 av = _mm256_broadcast_ss(a + 0);
    c00 = _mm256_fmadd_ps(av, b0, c00); c01 = _mm256_fmadd_ps(av, b1, c01);
    av = _mm256_broadcast_ss(a + 1);
    c10 = _mm256_fmadd_ps(av, b0, c10); c11 = _mm256_fmadd_ps(av, b1, c11);
    av = _mm256_broadcast_ss(a + 2);
    c20 = _mm256_fmadd_ps(av, b0, c20); c21 = _mm256_fmadd_ps(av, b1, c21);
    av = _mm256_broadcast_ss(a + 3);
    c30 = _mm256_fmadd_ps(av, b0, c30); c31 = _mm256_fmadd_ps(av, b1, c31);
    av = _mm256_broadcast_ss(a + 4);
    c40 = _mm256_fmadd_ps(av, b0, c40); c41 = _mm256_fmadd_ps(av, b1, c41);
    av = _mm256_broadcast_ss(a + 5);
    c50 = _mm256_fmadd_ps(av, b0, c50); c51 = _mm256_fmadd_ps(av, b1, c51);
  }
  _mm256_storeu_ps(c + 0 * ldc, c00); _mm256_storeu_ps(c + 0 * ldc + 8, c01);
  _mm256_storeu_ps(c + 1 * ldc, c10); _mm256_storeu_ps(c + 1 * ldc + 8, c11);
  _mm256_storeu_ps(c + 2 * ldc, c20); _mm256_storeu_ps(c + 2 * ldc + 8, c21);
  _mm256_storeu_ps(c + 3 * ldc, c30); _mm256_storeu_ps(c + 3 * ldc + 8, c31);
  _mm256_storeu_ps(c + 4 * ldc, c40); _mm256_storeu_ps(c + 4 * ldc + 8, c41);
  _mm256_storeu_ps(c + 5 * ldc, c50); _mm256_storeu_ps(c + 5 * ldc + 8, c51);
}

// Two accumulators per row hide the FMA latency (8 chains); one load of t serves 4 rows.
FURL_AVX2 void dots4_avx2(const float* const* x, const float* t, int64_t n, float* out) {
  __m256 acc[4][2];
  for (int r = 0; r < 4; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256 t0 = _mm256_loadu_ps(t + i), t1 = _mm256_loadu_ps(t + i + 8);
    for (int r = 0; r < 4; ++r) {
      acc[r][0] = _mm256_fmadd_ps(_mm256_loadu_ps(x[r] + i), t0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(_mm256_loadu_ps(x[r] + i + 8), t1, acc[r][1]);
    }
  }
  for (int r = 0; r < 4; ++r) {
    float s = hsum(_mm256_add_ps(acc[r][0], acc[r][1]));
    for (int64_t j = i; j < n; ++j) s += x[r][j] * t[j];
    out[r] = s;
  }
}

FURL_AVX2 float dot1_avx2(const float* a, const float* b, int64_t n) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
  }
  float s = hsum(_mm256_add_ps(acc0, acc1));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

FURL_AVX2 void half_to_float_f16c(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i,
                     _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  for (; i < n; ++i) dst[i] = half_bits_to_float(src[i]);
}
#endif  // FURL_FAST_X86_SIMD



}  // namespace

const Simd& simd() {
  static const Simd s = [] {
    Simd r{micro_kernel_generic, dots4_generic, dot1_generic, half_to_float_generic};
#ifdef FURL_FAST_X86_SIMD
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("f16c")) {
      r.micro_kernel = micro_kernel_avx2;
      r.dots4 = dots4_avx2;
      r.dot1 = dot1_avx2;
      r.half_to_float = half_to_float_f16c;
    }
#endif
    return r;
  }();
  return s;
}

// Packs panel j of a (depth, cols) matrix into dst[j * depth * kNR ...].
void pack_panel(const float* m, int64_t depth, int64_t cols, int64_t j, float* dst) {
  const int64_t width = std::min<int64_t>(kNR, cols - j * kNR);
  for (int64_t k = 0; k < depth; ++k) {
    float* row = dst + (j * depth + k) * kNR;
    std::memcpy(row, m + k * cols + j * kNR, width * sizeof(float));
    for (int64_t c = width; c < kNR; ++c) row[c] = 0.f;
  }
}

// Rows per block for n rows on `threads` workers: a multiple of kMR, about 8 micro-panels (48 rows),
// but small enough that every worker gets at least 4 blocks. A helper thread may start late or be
// preempted on a busy machine; with small blocks the other workers take over its share and the
// wait for its last block is short.
int64_t row_block_for(int64_t n, int threads) {
  const int64_t panels = (n + kMR - 1) / kMR;
  const int64_t per_block = (panels + 4 * threads - 1) / (4 * threads);
  return std::clamp<int64_t>(per_block, 1, 8) * kMR;
}

// Packs rows [0, rows) of a float (rows, depth) matrix with row stride ld into micro-panels of
// kMR rows ([k][kMR], zero rows past `rows`); dst holds ceil(rows / kMR) * kMR * depth floats.
void pack_rows(const float* src, int64_t rows, int64_t depth, int64_t ld, float* dst) {
  for (int64_t p = 0; p * kMR < rows; ++p, dst += kMR * depth)
    for (int i = 0; i < kMR; ++i) {
      const int64_t r = p * kMR + i;
      if (r < rows) {
        const float* s = src + r * ld;
        for (int64_t k = 0; k < depth; ++k) dst[k * kMR + i] = s[k];
      } else {
        for (int64_t k = 0; k < depth; ++k) dst[k * kMR + i] = 0.f;
      }
    }
}

// C (row_panels * kMR, b.panels() * kNR), row stride ldc = A (packed rows, depth) @ B.
void gemm(const float* a, int64_t row_panels, const RightOperand& b, float* c, int64_t ldc) {
  const MicroKernel kernel = simd().micro_kernel;
  const int64_t depth = b.depth;
  for (int64_t k0 = 0; k0 < depth; k0 += kKc) {
    const int64_t kc = std::min(kKc, depth - k0);
    for (int64_t j = 0; j < b.panels(); ++j) {
      const float* bj = b.data + (j * depth + k0) * kNR;
      for (int64_t i = 0; i < row_panels; ++i)
        kernel(kc, a + (i * depth + k0) * kMR, bj, kNR, c + i * kMR * ldc + j * kNR, ldc, k0 > 0);
    }
  }
}

}  // namespace furl_fast::cpu
