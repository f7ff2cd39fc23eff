#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>

#include "furl_fast/cuda_check.h"
#include "furl_fast/preprocess.h"

namespace furl_fast {
namespace {

struct KernelParams {
  int64_t n, h, w, size, crop_top, crop_left;
  ResampleAxis ay, ax;
  bool flip, bgr;
  float scale[3], shift[3];
};

__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// One thread per output pixel, all three channels; the tap weights are recomputed on the fly (a few
// flops) rather than staged, and the same pixel of every frame in the batch reuses them.
template <typename OutT>
__global__ void preprocess_frames_kernel(const uint8_t* __restrict__ frames, OutT* __restrict__ out,
                                         const KernelParams kp) {
  const int64_t ox = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t oy = blockIdx.y * static_cast<int64_t>(blockDim.y) + threadIdx.y;
  if (ox >= kp.size || oy >= kp.size) return;
  const Window wy = window_of(kp.ay, oy);
  const Window wx = window_of(kp.ax, ox);
  const float total = window_total(kp.ay, wy) * window_total(kp.ax, wx);
  const float inv_total = total != 0.f ? 1.f / total : 0.f;
  const int64_t plane = kp.size * kp.size;
  for (int64_t b = blockIdx.z; b < kp.n; b += gridDim.z) {
    float acc[3] = {0.f, 0.f, 0.f};
    for (int j = 0; j < wy.count; ++j) {
      const float w_y = tap_weight(kp.ay, wy, j);
      const int64_t yc = kp.crop_top + clamp_index(wy.first + j, kp.ay.in_size);
      const int64_t y = kp.flip ? kp.h - 1 - yc : yc;
      const uint8_t* line = frames + ((b * kp.h + y) * kp.w + kp.crop_left) * 3;
      for (int k = 0; k < wx.count; ++k) {
        const float wgt = w_y * tap_weight(kp.ax, wx, k);
        const uint8_t* px = line + clamp_index(wx.first + k, kp.ax.in_size) * 3;
        acc[0] += wgt * static_cast<float>(px[0]);
        acc[1] += wgt * static_cast<float>(px[1]);
        acc[2] += wgt * static_cast<float>(px[2]);
      }
    }
    OutT* dst = out + b * 3 * plane + oy * kp.size + ox;
    for (int c = 0; c < 3; ++c)
      store(dst + c * plane, acc[kp.bgr ? 2 - c : c] * inv_total * kp.scale[c] + kp.shift[c]);
  }
}

template <typename OutT>
void launch(const TensorView& frames, const TensorView& out, const KernelParams& kp,
            cudaStream_t stream) {
  const dim3 block(32, 8);
  const dim3 grid(static_cast<unsigned>((kp.size + block.x - 1) / block.x),
                  static_cast<unsigned>((kp.size + block.y - 1) / block.y),
                  static_cast<unsigned>(std::min<int64_t>(kp.n, 65535)));
  preprocess_frames_kernel<OutT>
      <<<grid, block, 0, stream>>>(frames.ptr<uint8_t>(), out.ptr<OutT>(), kp);
  FURL_CUDA_CHECK_LAUNCH("preprocess_frames_kernel");
}

}  // namespace

void preprocess_frames_cuda(const TensorView& frames, const TensorView& out,
                            const PreprocessParams& p, uintptr_t stream) {
  check_preprocess_args("preprocess_frames_cuda", frames, out, p, DeviceKind::kCUDA);
  const bool aa = preprocess_antialias(p);
  const bool cubic = p.interpolation == Interpolation::kBicubic;
  KernelParams kp;
  kp.n = frames.shape[0];
  kp.h = frames.shape[1];
  kp.w = frames.shape[2];
  kp.size = p.size;
  kp.crop_top = p.crop_top;
  kp.crop_left = p.crop_left;
  kp.ay = make_axis(p.crop_height, p.size, aa, cubic);
  kp.ax = make_axis(p.crop_width, p.size, aa, cubic);
  kp.flip = p.flip_vertical;
  kp.bgr = p.bgr;
  for (int c = 0; c < 3; ++c) {
    kp.scale[c] = 1.f / (255.f * p.std[c]);
    kp.shift[c] = -p.mean[c] / p.std[c];
  }
  CudaDeviceGuard guard(frames.device_index);
  const auto s = cuda_stream(stream);
  switch (out.dtype) {
    case DType::kFloat32: launch<float>(frames, out, kp, s); break;
    case DType::kFloat16: launch<__half>(frames, out, kp, s); break;
    default: launch<__nv_bfloat16>(frames, out, kp, s); break;
  }
}

}  // namespace furl_fast
