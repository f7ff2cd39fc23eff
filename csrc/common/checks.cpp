// The argument checks shared by the CPU and CUDA kernels (csrc/cpu/, csrc/cuda/): every entry point
// runs them before touching memory, so a bad tensor is a TypeError / ValueError naming the argument.
#include <cmath>
#include <initializer_list>
#include <string>

#include "furl_fast/preprocess.h"
#include "furl_fast/rewards.h"

namespace furl_fast {

// ---- preprocess_frames -------------------------------------------------------------------------

void check_preprocess_args(const char* op, const TensorView& frames, const TensorView& out,
                           const PreprocessParams& p, DeviceKind device) {
  Expect(frames, op, "frames").ndim(4, "(N, H, W, 3)").dtype({DType::kUInt8}).device(device)
      .dim(3, 3, "RGB channels").contiguous().nonempty();
  const int64_t n = frames.shape[0], h = frames.shape[1], w = frames.shape[2];
  if (p.size < 1 || p.size > kMaxPreprocessSize)
    throw ValueError(std::string(op) + ": argument 'size' must be in [1, " +
                     std::to_string(kMaxPreprocessSize) + "], got " + std::to_string(p.size) + ".");
  // top > h - height rather than top + height > h: the sum of two int64 arguments can overflow.
  if (p.crop_height < 1 || p.crop_width < 1 || p.crop_top < 0 || p.crop_left < 0 ||
      p.crop_top > h - p.crop_height || p.crop_left > w - p.crop_width)
    throw ValueError(std::string(op) + ": argument 'crop' (top, left, height, width) = (" +
                     std::to_string(p.crop_top) + ", " + std::to_string(p.crop_left) + ", " +
                     std::to_string(p.crop_height) + ", " + std::to_string(p.crop_width) +
                     ") must be a non-empty box inside the " + std::to_string(h) + "x" +
                     std::to_string(w) + " frame.");
  for (int c = 0; c < 3; ++c)
    if (!(std::isfinite(p.std[c]) && p.std[c] != 0.f && std::isfinite(p.mean[c])))
      throw ValueError(std::string(op) + ": arguments 'mean' and 'std' must be finite and std non-zero.");
  Expect(out, op, "out").ndim(4, "(N, 3, size, size)")
      .dtype({DType::kFloat32, DType::kFloat16, DType::kBFloat16}).same_device(frames, "frames")
      .dim(0, n, "batch, as in frames").dim(1, 3, "channels").dim(2, p.size, "size")
      .dim(3, p.size, "size").contiguous().writable().nonempty().aligned();
}

// ---- reward heads ----------------------------------------------------------------------------

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

}  // namespace furl_fast
