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
#include "gemm.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <vector>

#include "furl_fast/half.h"
#include "furl_fast/rewards.h"
#include "furl_fast/thread_pool.h"

namespace furl_fast {

// ---------------------------------------------------------------------------------------------
// Kernels.

namespace {

using namespace cpu;

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
