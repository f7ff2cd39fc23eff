// Fused reward heads: the arithmetic every VLM reward ends in, one pass over a batch of embeddings.
// Equivalent: furl_fast.reference.{mlp_cosine_reward, clip_similarity, goal_baseline_reward,
// softmax_goal_reward}.
//
// Shared rules (the reference follows the same ones, so native and reference agree):
// - Embeddings (emb / img_emb) are float32, float16 or bfloat16; everything else (weights, targets,
//   text, goal and baseline vectors) is float32 (the Python wrapper converts them: they are small).
//   All arithmetic accumulates in float32; outputs are float32.
// - Cosine: cos(a, b) = a.b / (max(|a|, kNormEps) * max(|b|, kNormEps)). A zero vector therefore has
//   similarity exactly 0 with everything, never NaN. NaN in any input propagates to the outputs it
//   touches (no special-casing).
// - All tensors are contiguous and on the device of the implementation; shapes as documented below.
#pragma once

#include <cstdint>

#include "furl_fast/tensor.h"

namespace furl_fast {

// 1e-6 rather than 1e-8: the reference runs in float16 too, where 1e-8 rounds to 0 and a zero row
// would give 0/0. Real embeddings and head outputs have norms of order 1 to 100.
constexpr float kNormEps = 1e-6f;

// mlp_cosine_reward: z = relu(emb @ w1 + b1) @ w2 + b2, out[n, k] = cos(z[n], target[k]).
//   emb (N, D), w1 (D, H), b1 (H,), w2 (H, P), b2 (P,), target (K, P), out (N, K) float32.
struct MlpCosineParams {
  int num_threads = 0;  // CPU only; 0 = all cores
};

// clip_similarity: out[n, k] = cos(img[n], text[k]) (normalize) or img[n] . text[k] (not).
//   img (N, D), text (K, D), out (N, K) float32.
struct ClipSimilarityParams {
  bool normalize = true;
  int num_threads = 0;
};

// goal_baseline_reward (VLM-RM): x = img / max(|img|, eps), d = g - b,
//   P = alpha d d^T / max(|d|, eps)^2 + (1 - alpha) I, out[n] = 1 - 0.5 |(x - g) P|^2.
// Never forms P: with u = d / max(|d|, eps) (so P = alpha u u^T + (1 - alpha) I), v = x - g and
// s = v.u:  |vP|^2 = alpha^2 |u|^2 s^2 + 2 alpha (1 - alpha) s^2 + (1 - alpha)^2 |v|^2,
// where |u| = 1 unless |d| < eps. The dot products it needs are x.x, x.g and x.d per row.
//   img (N, D), goal (D,), baseline (D,) (already averaged over prompts), out (N,) float32.
struct GoalBaselineParams {
  float alpha = 0.5f;  // in [0, 1]
  int num_threads = 0;
};

// softmax_goal_reward (Baumli et al.): p[n] = softmax_k(cos(img[n], text[k]) / temperature)[goal],
// or 1[p > threshold] as 0.f / 1.f when has_threshold.
//   img (N, D), text (K, D), out (N,) float32.
struct SoftmaxGoalParams {
  int64_t goal_index = 0;  // in [0, K)
  float temperature = 0.01f;  // > 0
  bool has_threshold = false;
  float threshold = 0.5f;
  int num_threads = 0;
};

// Argument checks shared by the CPU and CUDA entry points; throw TypeError / ValueError naming the
// argument. `device` is the device every tensor must be on.
void check_mlp_cosine_args(const char* op, const TensorView& emb, const TensorView& w1,
                           const TensorView& b1, const TensorView& w2, const TensorView& b2,
                           const TensorView& target, const TensorView& out, DeviceKind device);
void check_text_similarity_args(const char* op, const TensorView& img, const TensorView& text,
                                const TensorView& out, int out_ndim, DeviceKind device);
void check_goal_baseline_args(const char* op, const TensorView& img, const TensorView& goal,
                              const TensorView& baseline, const TensorView& out,
                              const GoalBaselineParams& p, DeviceKind device);
void check_softmax_goal_params(const char* op, const SoftmaxGoalParams& p, int64_t num_texts);

void mlp_cosine_reward_cpu(const TensorView& emb, const TensorView& w1, const TensorView& b1,
                           const TensorView& w2, const TensorView& b2, const TensorView& target,
                           const TensorView& out, const MlpCosineParams& p);
void clip_similarity_cpu(const TensorView& img, const TensorView& text, const TensorView& out,
                         const ClipSimilarityParams& p);
void goal_baseline_reward_cpu(const TensorView& img, const TensorView& goal,
                              const TensorView& baseline, const TensorView& out,
                              const GoalBaselineParams& p);
void softmax_goal_reward_cpu(const TensorView& img, const TensorView& text, const TensorView& out,
                             const SoftmaxGoalParams& p);

#ifdef FURL_FAST_WITH_CUDA
void mlp_cosine_reward_cuda(const TensorView& emb, const TensorView& w1, const TensorView& b1,
                            const TensorView& w2, const TensorView& b2, const TensorView& target,
                            const TensorView& out, uintptr_t stream);
void clip_similarity_cuda(const TensorView& img, const TensorView& text, const TensorView& out,
                          const ClipSimilarityParams& p, uintptr_t stream);
void goal_baseline_reward_cuda(const TensorView& img, const TensorView& goal,
                               const TensorView& baseline, const TensorView& out,
                               const GoalBaselineParams& p, uintptr_t stream);
void softmax_goal_reward_cuda(const TensorView& img, const TensorView& text, const TensorView& out,
                              const SoftmaxGoalParams& p, uintptr_t stream);
#endif

}  // namespace furl_fast
