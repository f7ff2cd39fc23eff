// preprocess_frames: uint8 frames (N, H, W, 3) -> optional vertical flip -> crop box -> resize to
// size x size -> /255 -> (x - mean) / std -> (N, 3, size, size) float32 / float16 / bfloat16.
// Equivalent: furl_fast.reference.preprocess_frames.
#pragma once

#include <cstdint>

#include "furl_fast/resample.h"
#include "furl_fast/tensor.h"

namespace furl_fast {

// The largest output side (a 8192 x 8192 x 3 float32 image per frame is already 768 MiB).
constexpr int64_t kMaxPreprocessSize = 8192;

struct PreprocessParams {
  int64_t crop_top = 0, crop_left = 0, crop_height = 0, crop_width = 0;  // in the flipped frame
  int64_t size = 224;
  bool flip_vertical = false;
  bool bgr = false;  // output channel c reads input channel 2 - c
  Interpolation interpolation = Interpolation::kBilinear;
  float mean[3] = {0.f, 0.f, 0.f};
  float std[3] = {1.f, 1.f, 1.f};
};

// Antialias exactly when some axis is downsampled (what the reference passes to F.interpolate).
inline bool preprocess_antialias(const PreprocessParams& p) {
  return p.crop_height > p.size || p.crop_width > p.size;
}

// Validates every argument of both implementations; throws TypeError / ValueError naming the argument.
void check_preprocess_args(const char* op, const TensorView& frames, const TensorView& out,
                           const PreprocessParams& p, DeviceKind device);

void preprocess_frames_cpu(const TensorView& frames, const TensorView& out, const PreprocessParams& p,
                           int num_threads);
#ifdef FURL_FAST_WITH_CUDA
void preprocess_frames_cuda(const TensorView& frames, const TensorView& out,
                            const PreprocessParams& p, uintptr_t stream);
#endif

}  // namespace furl_fast
