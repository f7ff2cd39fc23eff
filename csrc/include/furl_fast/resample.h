// Resampling weights shared by the CPU and CUDA preprocess kernels. They reproduce
// torch.nn.functional.interpolate(align_corners=False) on float input:
//  - antialias=False: bilinear (source index clamped at 0) and bicubic (Keys a = -0.75, edge
//    pixels repeated), as in ATen's UpSample kernels;
//  - antialias=True: the separable filter of ATen's _upsample_*_aa (PIL's scheme): support widened
//    by the downscale factor, bicubic with a = -0.5, taps clipped to the image and renormalised.
// Arithmetic is in float, as ATen does for float tensors, so the tap windows agree at boundaries.
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define FURL_HD __host__ __device__ __forceinline__
#else
#define FURL_HD inline
#endif

namespace furl_fast {

enum class Interpolation : int { kBilinear = 0, kBicubic = 1 };

struct ResampleAxis {
  int64_t in_size;
  double scale;  // in_size / out_size; used in float except for non-antialiased bicubic (below)
  bool antialias;
  bool cubic;
};

// The taps of one output index: source indices first .. first + count - 1 (clamp to the image when
// reading), each with tap_weight(); weights are divided by `total` (1 unless antialiasing).
struct Window {
  int64_t first;
  int count;
  float center;  // antialias: filter centre in source coordinates; otherwise the fractional offset t
  float inv_scale;
};

FURL_HD ResampleAxis make_axis(int64_t in_size, int64_t out_size, bool antialias, bool cubic) {
  return ResampleAxis{in_size, static_cast<double>(in_size) / static_cast<double>(out_size), antialias,
                      cubic};
}

FURL_HD float cubic_conv1(float x, float a) { return ((a + 2.f) * x - (a + 3.f)) * x * x + 1.f; }
FURL_HD float cubic_conv2(float x, float a) { return ((a * x - 5.f * a) * x + 8.f * a) * x - 4.f * a; }

FURL_HD float aa_filter(float x, bool cubic) {
  x = fabsf(x);
  if (!cubic) return x < 1.f ? 1.f - x : 0.f;
  constexpr float a = -0.5f;
  if (x < 1.f) return cubic_conv1(x, a);
  if (x < 2.f) return cubic_conv2(x, a);
  return 0.f;
}

FURL_HD Window window_of(const ResampleAxis& ax, int64_t o) {
  Window w;
  const float scale = static_cast<float>(ax.scale);
  if (ax.antialias) {
    const float interp_size = ax.cubic ? 4.f : 2.f;
    const float support = scale >= 1.f ? interp_size * 0.5f * scale : interp_size * 0.5f;
    w.center = scale * (static_cast<float>(o) + 0.5f);
    w.inv_scale = scale >= 1.f ? 1.f / scale : 1.f;
    int64_t lo = static_cast<int64_t>(w.center - support + 0.5f);
    if (lo < 0) lo = 0;
    int64_t hi = static_cast<int64_t>(w.center + support + 0.5f);
    if (hi > ax.in_size) hi = ax.in_size;
    w.first = lo;
    w.count = static_cast<int>(hi - lo);
  } else {
    w.inv_scale = 1.f;
    if (ax.cubic) {
      // The fractional offset t in double: in float (ATen's way) its rounding error moves the cubic
      // weights by ~1e-5 of the pixel range, which is most of float32 bicubic's total error.
      const double src_d = ax.scale * (static_cast<double>(o) + 0.5) - 0.5;
      const double fl = floor(src_d);
      w.first = static_cast<int64_t>(fl) - 1;
      w.center = static_cast<float>(src_d - fl);
      w.count = 4;
    } else {
      float src = scale * (static_cast<float>(o) + 0.5f) - 0.5f;
      if (src < 0.f) src = 0.f;
      int64_t i0 = static_cast<int64_t>(floorf(src));
      if (i0 > ax.in_size - 1) i0 = ax.in_size - 1;
      float t = src - static_cast<float>(i0);
      w.center = t < 0.f ? 0.f : (t > 1.f ? 1.f : t);
      w.first = i0;
      w.count = 2;
    }
  }
  return w;
}

// Un-normalised weight of tap j (0 <= j < count).
FURL_HD float tap_weight(const ResampleAxis& ax, const Window& w, int j) {
  if (ax.antialias)
    return aa_filter((static_cast<float>(w.first + j) - w.center + 0.5f) * w.inv_scale, ax.cubic);
  const float t = w.center;
  if (!ax.cubic) return j == 0 ? 1.f - t : t;
  constexpr float a = -0.75f;
  switch (j) {
    case 0: return cubic_conv2(t + 1.f, a);
    case 1: return cubic_conv1(t, a);
    case 2: return cubic_conv1(1.f - t, a);
    default: return cubic_conv2(2.f - t, a);
  }
}

FURL_HD float window_total(const ResampleAxis& ax, const Window& w) {
  if (!ax.antialias) return 1.f;
  float total = 0.f;
  for (int j = 0; j < w.count; ++j) total += tap_weight(ax, w, j);
  return total;
}

FURL_HD int64_t clamp_index(int64_t i, int64_t size) { return i < 0 ? 0 : (i >= size ? size - 1 : i); }

}  // namespace furl_fast
