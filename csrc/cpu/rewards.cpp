// CPU reward heads (see furl_fast/rewards.h for the maths and the shared rules).
//
// Performance notes. mlp_cosine_reward is dominated by emb @ w1 (N x D x H). The eager PyTorch chain
// runs it as one big GEMM that writes the (N, H) hidden activations to memory, then reads them back
// for bias + relu, the second layer and the cosine. Here each thread takes blocks of 6-48 rows,
// runs the first layer with a register-blocked 6 x 16 micro-kernel over packed operands (w1 packed
// once per call into 16-column panels, the row block packed and converted to float32), and finishes
// bias + relu + second layer + cosine while the block's hidden rows are still in L2.
// The similarity heads stream each embedding row once from memory: 4 rows are converted to float32
// into an L1-resident buffer and dotted against each (pre-normalised) text vector, so one load of a
// text vector serves 4 rows.
// x86-64 builds carry an AVX2+FMA(+F16C) path chosen at run time and a portable path (plain loops
// that compilers auto-vectorise) used elsewhere.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "furl_fast/rewards.h"
#include "furl_fast/thread_pool.h"

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define FURL_FAST_X86_SIMD 1
#include <immintrin.h>
#endif

namespace furl_fast {

// ---------------------------------------------------------------------------------------------
// Argument checks (shared with csrc/cuda/rewards.cu).

namespace {
constexpr std::initializer_list<DType> kEmbDtypes = {DType::kFloat32, DType::kFloat16,
                                                     DType::kBFloat16};

void check_emb(const char* op, const char* name, const TensorView& t, DeviceKind device) {
  Expect(t, op, name).ndim(2, "(N, D)").dtype(kEmbDtypes).device(device).contiguous().nonempty()
      .aligned();
}
void check_f32(const char* op, const char* name, const TensorView& t, const TensorView& like,
               const char* like_name, int ndim, const char* layout) {
  Expect(t, op, name).ndim(ndim, layout).dtype({DType::kFloat32}).same_device(like, like_name)
      .contiguous().nonempty().aligned();
}
}  // namespace

void check_mlp_cosine_args(const char* op, const TensorView& emb, const TensorView& w1,
                           const TensorView& b1, const TensorView& w2, const TensorView& b2,
                           const TensorView& target, const TensorView& out, DeviceKind device) {
  check_emb(op, "emb", emb, device);
  const int64_t n = emb.shape[0], d = emb.shape[1];
  check_f32(op, "w1", w1, emb, "emb", 2, "(D, H)");
  Expect(w1, op, "w1").dim(0, d, "D, the embedding width of 'emb'");
  const int64_t h = w1.shape[1];
  check_f32(op, "b1", b1, emb, "emb", 1, "(H,)");
  Expect(b1, op, "b1").dim(0, h, "H, the hidden width of 'w1'");
  check_f32(op, "w2", w2, emb, "emb", 2, "(H, P)");
  Expect(w2, op, "w2").dim(0, h, "H, the hidden width of 'w1'");
  const int64_t p = w2.shape[1];
  check_f32(op, "b2", b2, emb, "emb", 1, "(P,)");
  Expect(b2, op, "b2").dim(0, p, "P, the output width of 'w2'");
  check_f32(op, "target", target, emb, "emb", 2, "(K, P)");
  Expect(target, op, "target").dim(1, p, "P, the output width of 'w2'");
  check_f32(op, "out", out, emb, "emb", 2, "(N, K)");
  Expect(out, op, "out").dim(0, n, "N, as in 'emb'").dim(1, target.shape[0], "K, as in 'target'")
      .writable();
}

void check_text_similarity_args(const char* op, const TensorView& img, const TensorView& text,
                                const TensorView& out, int out_ndim, DeviceKind device) {
  check_emb(op, "img_emb", img, device);
  check_f32(op, "text_emb", text, img, "img_emb", 2, "(K, D)");
  Expect(text, op, "text_emb").dim(1, img.shape[1], "D, the embedding width of 'img_emb'");
  if (out_ndim == 2) {
    check_f32(op, "out", out, img, "img_emb", 2, "(N, K)");
    Expect(out, op, "out").dim(1, text.shape[0], "K, as in 'text_emb'");
  } else {
    check_f32(op, "out", out, img, "img_emb", 1, "(N,)");
  }
  Expect(out, op, "out").dim(0, img.shape[0], "N, as in 'img_emb'").writable();
}

void check_goal_baseline_args(const char* op, const TensorView& img, const TensorView& goal,
                              const TensorView& baseline, const TensorView& out,
                              const GoalBaselineParams& p, DeviceKind device) {
  check_emb(op, "img_emb", img, device);
  const int64_t d = img.shape[1];
  check_f32(op, "goal_emb", goal, img, "img_emb", 1, "(D,)");
  Expect(goal, op, "goal_emb").dim(0, d, "D, the embedding width of 'img_emb'");
  check_f32(op, "baseline_emb", baseline, img, "img_emb", 1, "(D,)");
  Expect(baseline, op, "baseline_emb").dim(0, d, "D, the embedding width of 'img_emb'");
  check_f32(op, "out", out, img, "img_emb", 1, "(N,)");
  Expect(out, op, "out").dim(0, img.shape[0], "N, as in 'img_emb'").writable();
  if (!(p.alpha >= 0.f && p.alpha <= 1.f))
    throw ValueError(std::string(op) + ": argument 'alpha' must be in [0, 1], got " +
                     std::to_string(p.alpha) + ".");
}

void check_softmax_goal_params(const char* op, const SoftmaxGoalParams& p, int64_t num_texts) {
  if (p.goal_index < 0 || p.goal_index >= num_texts)
    throw ValueError(std::string(op) + ": argument 'goal_index' must be in [0, " +
                     std::to_string(num_texts) + ") (a row of 'text_emb'), got " +
                     std::to_string(p.goal_index) + ".");
  if (!(p.temperature > 0.f) || !std::isfinite(p.temperature))
    throw ValueError(std::string(op) +
                     ": argument 'temperature' must be a finite number > 0, got " +
                     std::to_string(p.temperature) + ".");
  if (p.has_threshold && !std::isfinite(p.threshold))
    throw ValueError(std::string(op) + ": argument 'threshold' must be finite.");
}

// ---------------------------------------------------------------------------------------------
// Kernels.

namespace {

inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1fu) {
    bits = sign | 0x7f800000u | (mant << 13);  // inf / NaN
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (mant << 13);  // rebias 15 -> 127
  } else if (mant == 0) {
    bits = sign;
  } else {  // subnormal half: normalise the mantissa
    uint32_t e = 113u;
    while ((mant & 0x400u) == 0) {
      mant <<= 1;
      --e;
    }
    bits = sign | (e << 23) | ((mant & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline float bf16_bits_to_float(uint16_t b) {
  const uint32_t bits = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

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

struct Simd {
  MicroKernel micro_kernel = micro_kernel_generic;
  Dots4 dots4 = dots4_generic;
  Dot1 dot1 = dot1_generic;
  HalfToFloat half_to_float = half_to_float_generic;
};

const Simd& simd() {
  static const Simd s = [] {
    Simd r;
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

// Row i of an (N, D) embedding of any supported dtype, as float32 in dst[0, D).
void load_row(const TensorView& t, int64_t i, float* dst) {
  const int64_t d = t.shape[1];
  switch (t.dtype) {
    case DType::kFloat32: std::memcpy(dst, t.ptr<float>() + i * d, d * sizeof(float)); break;
    case DType::kFloat16: simd().half_to_float(t.ptr<uint16_t>() + i * d, dst, d); break;
    default: {
      const uint16_t* src = t.ptr<uint16_t>() + i * d;
      for (int64_t j = 0; j < d; ++j) dst[j] = bf16_bits_to_float(src[j]);
    }
  }
}

inline float inv_norm(float sumsq) { return 1.f / std::max(std::sqrt(sumsq), kNormEps); }

// Grow-only scratch owned by the calling (Python) thread: a training loop calls these ops every step,
// and reusing the same pages avoids faulting in fresh ones (a large share of the time at small N).
// Returned 64-byte aligned, so packed 16-float panel rows never straddle two cache lines.
float* scratch(size_t floats) {
  thread_local std::vector<float> buf;
  if (buf.size() < floats + 16) buf.resize(floats + 16);
  const uintptr_t addr = reinterpret_cast<uintptr_t>(buf.data());
  return reinterpret_cast<float*>((addr + 63) & ~uintptr_t{63});
}

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

// Rows of a target / text matrix (K, W), each divided by max(|row|, eps) (or copied unchanged).
std::vector<float> normalised_rows(const TensorView& t, bool normalise) {
  const int64_t k = t.shape[0], w = t.shape[1];
  std::vector<float> r(t.ptr<float>(), t.ptr<float>() + k * w);
  if (normalise)
    for (int64_t i = 0; i < k; ++i) {
      const float s = inv_norm(simd().dot1(&r[i * w], &r[i * w], w));
      for (int64_t j = 0; j < w; ++j) r[i * w + j] *= s;
    }
  return r;
}

// Visits the rows of an (N, D) embedding in groups of 4 converted to float32, in parallel:
// fn(first_row, count, rows) with rows[0..3] pointing at D floats (rows past count repeat row 0).
// dots_per_row: how many length-D dot products fn computes per row (sets the work-item size).
template <typename Fn>
void for_row_quads(const TensorView& img, int64_t dots_per_row, int num_threads, Fn&& fn) {
  const int64_t n = img.shape[0], d = img.shape[1];
  const int64_t quads = (n + 3) / 4;
  // Work items of at least ~64 K multiply-adds (several quads when rows are cheap): below that,
  // handing work to a helper costs more than it saves.
  const int64_t per_item = std::max<int64_t>(1, (1 << 16) / (4 * d * dots_per_row));
  const int64_t items = (quads + per_item - 1) / per_item;
  const int threads = static_cast<int>(std::min<int64_t>(resolve_threads(num_threads), items));
  std::vector<std::vector<float>> bufs(threads, std::vector<float>(4 * d));
  parallel_blocks(items, threads, [&](int worker, int64_t item) {
    float* buf = bufs[worker].data();
    const float* rows[4];
    for (int64_t q = item * per_item; q < std::min(quads, (item + 1) * per_item); ++q) {
      const int64_t first = q * 4, count = std::min<int64_t>(4, n - first);
      for (int r = 0; r < 4; ++r) {
        if (r < count) load_row(img, first + r, buf + r * d);
        rows[r] = buf + (r < count ? r : 0) * d;
      }
      fn(first, count, rows);
    }
  });
}

}  // namespace

void mlp_cosine_reward_cpu(const TensorView& emb, const TensorView& w1, const TensorView& b1,
                           const TensorView& w2, const TensorView& b2, const TensorView& target,
                           const TensorView& out, const MlpCosineParams& p) {
  check_mlp_cosine_args("mlp_cosine_reward_cpu", emb, w1, b1, w2, b2, target, out,
                        DeviceKind::kCPU);
  const int64_t n = emb.shape[0], d = emb.shape[1], h = w1.shape[1], pw = w2.shape[1];
  const int64_t k = target.shape[0];
  const int64_t h_panels = (h + kNR - 1) / kNR, p_panels = (pw + kNR - 1) / kNR;
  const int64_t h_pad = h_panels * kNR, p_pad = p_panels * kNR;
  const bool convert = emb.dtype != DType::kFloat32;
  const int threads = static_cast<int>(
      std::min<int64_t>(resolve_threads(p.num_threads), (n + kMR - 1) / kMR));
  const int64_t rb = row_block_for(n, threads);
  const int64_t blocks = (n + rb - 1) / rb;
  // Per worker: the block's rows as float32 (half inputs only), packed rows, hidden, packed hidden, z.
  const int64_t per_worker = (convert ? rb * d : 0) + rb * (d + h_pad + h + p_pad);
  const int64_t w1_size = h_pad * d, w2_size = p_pad * h;
  float* const buf = scratch(w1_size + w2_size + threads * per_worker);
  float* const w1p = buf;
  float* const w2p = buf + w1_size;
  const RightOperand w1op{w1p, d, h}, w2op{w2p, h, pw};
  const std::vector<float> t_hat = normalised_rows(target, true);
  const float* bias1 = b1.ptr<float>();
  const float* bias2 = b2.ptr<float>();
  float* o = out.ptr<float>();
  // The caller packs the weights before any helper joins: a helper preempted halfway through a
  // shared packing phase would stall everyone.
  for (int64_t j = 0; j < h_panels; ++j) pack_panel(w1.ptr<float>(), d, h, j, w1p);
  for (int64_t j = 0; j < p_panels; ++j) pack_panel(w2.ptr<float>(), h, pw, j, w2p);
  std::atomic<int64_t> next_block{0};

  HelperPool::instance().run(threads - 1, [&](int worker) {
    float* rows = buf + w1_size + w2_size + worker * per_worker;
    float* a_packed = rows + (convert ? rb * d : 0);
    float* hidden = a_packed + rb * d;
    float* h_packed = hidden + rb * h_pad;
    float* z = h_packed + rb * h;
    for (int64_t blk = next_block++; blk < blocks; blk = next_block++) {
      const int64_t first = blk * rb, count = std::min(rb, n - first);
      const int64_t row_panels = (count + kMR - 1) / kMR;
      if (convert) {
        for (int64_t r = 0; r < count; ++r) load_row(emb, first + r, rows + r * d);
        pack_rows(rows, count, d, d, a_packed);
      } else {
        pack_rows(emb.ptr<float>() + first * d, count, d, d, a_packed);
      }
      gemm(a_packed, row_panels, w1op, hidden, h_pad);
      for (int64_t r = 0; r < count; ++r) {
        float* hr = hidden + r * h_pad;
        // max(x, 0) written as a select so NaN propagates like torch.relu (std::max would drop it).
        for (int64_t j = 0; j < h; ++j) {
          const float v = hr[j] + bias1[j];
          hr[j] = v < 0.f ? 0.f : v;
        }
      }
      pack_rows(hidden, count, h, h_pad, h_packed);
      gemm(h_packed, row_panels, w2op, z, p_pad);
      for (int64_t r = 0; r < count; ++r) {
        float* zr = z + r * p_pad;
        for (int64_t j = 0; j < pw; ++j) zr[j] += bias2[j];
        const float s = inv_norm(simd().dot1(zr, zr, pw));
        for (int64_t t = 0; t < k; ++t)
          o[(first + r) * k + t] = simd().dot1(zr, &t_hat[t * pw], pw) * s;
      }
    }
  });
}

void clip_similarity_cpu(const TensorView& img, const TensorView& text, const TensorView& out,
                         const ClipSimilarityParams& p) {
  check_text_similarity_args("clip_similarity_cpu", img, text, out, 2, DeviceKind::kCPU);
  const int64_t d = img.shape[1], k = text.shape[0];
  const std::vector<float> t_hat = normalised_rows(text, p.normalize);
  float* o = out.ptr<float>();
  const Simd& s = simd();
  for_row_quads(img, k + 1, p.num_threads, [&](int64_t first, int64_t count,
                                               const float* const* rows) {
    float scale[4] = {1.f, 1.f, 1.f, 1.f}, dots[4];
    if (p.normalize)
      for (int r = 0; r < 4; ++r) scale[r] = inv_norm(s.dot1(rows[r], rows[r], d));
    for (int64_t t = 0; t < k; ++t) {
      s.dots4(rows, &t_hat[t * d], d, dots);
      for (int64_t r = 0; r < count; ++r) o[(first + r) * k + t] = dots[r] * scale[r];
    }
  });
}

void goal_baseline_reward_cpu(const TensorView& img, const TensorView& goal,
                              const TensorView& baseline, const TensorView& out,
                              const GoalBaselineParams& p) {
  check_goal_baseline_args("goal_baseline_reward_cpu", img, goal, baseline, out, p,
                           DeviceKind::kCPU);
  const int64_t d = img.shape[1];
  const Simd& s = simd();
  const float* g = goal.ptr<float>();
  std::vector<float> dir(d);  // d = g - b
  for (int64_t j = 0; j < d; ++j) dir[j] = g[j] - baseline.ptr<float>()[j];
  const float dd = s.dot1(dir.data(), dir.data(), d);
  const float inv_d = inv_norm(dd);
  const float uu = dd * inv_d * inv_d;  // |u|^2: 1 unless |d| < eps
  const float gg = s.dot1(g, g, d), gd = s.dot1(g, dir.data(), d);
  const float a = p.alpha;
  const float c_s = a * a * uu + 2.f * a * (1.f - a), c_v = (1.f - a) * (1.f - a);
  float* o = out.ptr<float>();
  for_row_quads(img, 3, p.num_threads, [&](int64_t first, int64_t count,
                                           const float* const* rows) {
    float xg[4], xd[4];
    s.dots4(rows, g, d, xg);
    s.dots4(rows, dir.data(), d, xd);
    for (int64_t r = 0; r < count; ++r) {
      const float xx = s.dot1(rows[r], rows[r], d);
      const float inv_x = inv_norm(xx);
      // x = img / max(|img|, eps): every dot with x is the dot with img times inv_x.
      const float sproj = (xd[r] * inv_x - gd) * inv_d;    // (x - g).u
      const float vv = xx * inv_x * inv_x - 2.f * xg[r] * inv_x + gg;  // |x - g|^2
      o[first + r] = 1.f - 0.5f * (c_s * sproj * sproj + c_v * vv);
    }
  });
}

void softmax_goal_reward_cpu(const TensorView& img, const TensorView& text, const TensorView& out,
                             const SoftmaxGoalParams& p) {
  check_text_similarity_args("softmax_goal_reward_cpu", img, text, out, 1, DeviceKind::kCPU);
  const int64_t d = img.shape[1], k = text.shape[0];
  check_softmax_goal_params("softmax_goal_reward_cpu", p, k);
  const std::vector<float> t_hat = normalised_rows(text, true);
  float* o = out.ptr<float>();
  const Simd& s = simd();
  const float inv_temp = 1.f / p.temperature;
  for_row_quads(img, k + 1, p.num_threads, [&](int64_t first, int64_t count,
                                               const float* const* rows) {
    std::vector<float> logits(4 * k);
    float scale[4], dots[4];
    for (int r = 0; r < 4; ++r) scale[r] = inv_norm(s.dot1(rows[r], rows[r], d)) * inv_temp;
    for (int64_t t = 0; t < k; ++t) {
      s.dots4(rows, &t_hat[t * d], d, dots);
      for (int r = 0; r < 4; ++r) logits[r * k + t] = dots[r] * scale[r];
    }
    for (int64_t r = 0; r < count; ++r) {
      const float* l = &logits[r * k];
      float m = l[0];
      for (int64_t t = 1; t < k; ++t) m = std::max(m, l[t]);
      float sum = 0.f;
      for (int64_t t = 0; t < k; ++t) sum += std::exp(l[t] - m);
      const float prob = std::exp(l[p.goal_index] - m) / sum;
      // NaN stays NaN in the binary reward too (a comparison would turn it into 0).
      o[first + r] = !p.has_threshold || std::isnan(prob) ? prob : (prob > p.threshold ? 1.f : 0.f);
    }
  });
}

}  // namespace furl_fast
