// CUDA reward heads (see furl_fast/rewards.h for the maths and the shared rules). One launch per op,
// on the caller's stream.
//
// mlp_cosine_reward_kernel: one block per kBM-row block. The hidden layer is produced 64 columns at a
//   time (shared-memory tiles of emb and w1, a 4-column x kBM/16-row register tile per thread), gets
//   bias + relu in shared memory and is immediately multiplied into the block's (kBM, P) output
//   accumulator, so the (N, H) hidden activations never exist in global memory. The cosine with the
//   K targets ends the kernel (one warp per row, shuffle reductions).
// text_similarity_kernel (clip_similarity, softmax_goal_reward) and goal_baseline_reward_kernel: one
//   warp per embedding row (coalesced row reads, each row read once for up to 8 texts), blocks loop
//   over rows so per-block set-up (text norms, goal/baseline scalars) is amortised.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <string>

#include "furl_fast/cuda_check.h"
#include "furl_fast/rewards.h"

namespace furl_fast {
namespace {

constexpr int kThreads = 256;  // 8 warps
constexpr int kWarps = kThreads / 32;
constexpr int kBH = 64;        // hidden columns per chunk
constexpr int kBK = 32;        // depth per shared-memory tile
constexpr int kTextChunk = 8;  // texts dotted per pass over an embedding row (registers per lane)

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// 1 / max(|v|, eps); a NaN norm stays NaN (fmaxf would replace it by eps).
__device__ __forceinline__ float inv_norm(float sumsq) {
  const float n = sqrtf(sumsq), eps = kNormEps;
  return 1.f / (n < eps ? eps : n);
}

// relu that keeps NaN, like torch.relu (fmaxf(v, 0) would return 0).
__device__ __forceinline__ float relu(float v) { return v < 0.f ? 0.f : v; }

// ---- mlp_cosine_reward ------------------------------------------------------------------------

template <typename T, int kBM>
__global__ void __launch_bounds__(kThreads, 2)
    mlp_cosine_reward_kernel(const T* __restrict__ emb, const float* __restrict__ w1,
                             const float* __restrict__ b1, const float* __restrict__ w2,
                             const float* __restrict__ b2, const float* __restrict__ target,
                             float* __restrict__ out, int64_t n, int d, int h, int p, int k) {
  constexpr int kTM = kBM / 16;  // rows per thread
  __shared__ float a_tile[kBK][kBM + 1];  // transposed emb tile; +1 avoids bank conflicts on store
  __shared__ float b_tile[kBK][kBH];
  __shared__ float hidden[kBM][kBH + 1];
  extern __shared__ float z[];  // (kBM, p): the block's second-layer accumulator

  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kBM;

  for (int i = tid; i < kBM * p; i += kThreads) z[i] = 0.f;

  for (int j0 = 0; j0 < h; j0 += kBH) {
    // Columns tx, tx + 16, tx + 32, tx + 48 of the chunk: consecutive threads read consecutive
    // shared-memory words (no bank conflicts); a_tile reads are broadcasts.
    float acc[kTM][4];
#pragma unroll
    for (int i = 0; i < kTM; ++i)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[i][c] = 0.f;

    for (int k0 = 0; k0 < d; k0 += kBK) {
      for (int idx = tid; idx < kBM * kBK; idx += kThreads) {
        const int m = idx / kBK, kk = idx % kBK;
        const int64_t row = row0 + m;
        a_tile[kk][m] = (row < n && k0 + kk < d) ? to_float(emb[row * d + k0 + kk]) : 0.f;
      }
      for (int idx = tid; idx < kBK * kBH; idx += kThreads) {
        const int kk = idx / kBH, c = idx % kBH;
        b_tile[kk][c] = (k0 + kk < d && j0 + c < h) ? w1[static_cast<int64_t>(k0 + kk) * h + j0 + c]
                                                    : 0.f;
      }
      __syncthreads();
#pragma unroll 8
      for (int kk = 0; kk < kBK; ++kk) {
        float a[kTM], b[4];
#pragma unroll
        for (int i = 0; i < kTM; ++i) a[i] = a_tile[kk][ty * kTM + i];
#pragma unroll
        for (int c = 0; c < 4; ++c) b[c] = b_tile[kk][tx + 16 * c];
#pragma unroll
        for (int i = 0; i < kTM; ++i)
#pragma unroll
          for (int c = 0; c < 4; ++c) acc[i][c] = fmaf(a[i], b[c], acc[i][c]);
      }
      __syncthreads();
    }

#pragma unroll
    for (int i = 0; i < kTM; ++i)
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int col = j0 + tx + 16 * c;
        hidden[ty * kTM + i][tx + 16 * c] = col < h ? relu(acc[i][c] + b1[col]) : 0.f;
      }
    __syncthreads();

    // z[m][q] += hidden[m][:] . w2[j0:j0+width, q]; each z element belongs to one thread.
    const int width = min(kBH, h - j0);
    for (int idx = tid; idx < kBM * p; idx += kThreads) {
      const int m = idx / p, q = idx % p;
      const float* w = w2 + static_cast<int64_t>(j0) * p + q;
      float s = 0.f;
      for (int c = 0; c < width; ++c) s = fmaf(hidden[m][c], w[static_cast<int64_t>(c) * p], s);
      z[idx] += s;
    }
    __syncthreads();  // hidden is overwritten by the next chunk
  }

  // Cosine with every target: one warp per row.
  const int warp = tid / 32, lane = tid % 32;
  for (int m = warp; m < kBM; m += kWarps) {
    const int64_t row = row0 + m;
    if (row >= n) break;
    float zz = 0.f;
    for (int q = lane; q < p; q += 32) {
      const float v = z[m * p + q] + b2[q];
      z[m * p + q] = v;  // only this warp touches row m
      zz = fmaf(v, v, zz);
    }
    __syncwarp();
    const float inv_z = inv_norm(warp_sum(zz));
    for (int t = 0; t < k; ++t) {
      float dot = 0.f, tt = 0.f;
      for (int q = lane; q < p; q += 32) {
        const float tv = target[static_cast<int64_t>(t) * p + q];
        dot = fmaf(z[m * p + q], tv, dot);
        tt = fmaf(tv, tv, tt);
      }
      dot = warp_sum(dot);
      tt = warp_sum(tt);
      if (lane == 0) out[row * k + t] = dot * inv_z * inv_norm(tt);
    }
  }
}

constexpr int kMaxDevices = 64;

// The dynamic shared memory mlp_cosine_reward_kernel<T, kBM> may use on `device`: the device's
// opt-in limit minus the kernel's static shared memory. The kernel's limit is raised to it once per
// device (cudaFuncSetAttribute per call would race between threads that launch with the GIL
// released); errors are kept and rethrown on every call.
template <typename T, int kBM>
size_t mlp_dynamic_smem_limit(int device) {
  static std::once_flag once[kMaxDevices];
  static size_t limit[kMaxDevices];
  static cudaError_t error[kMaxDevices];
  if (device < 0 || device >= kMaxDevices)
    throw ValueError("mlp_cosine_reward_cuda: CUDA device " + std::to_string(device) +
                     " is beyond the " + std::to_string(kMaxDevices) + " devices supported.");
  std::call_once(once[device], [device] {
    const auto kernel = mlp_cosine_reward_kernel<T, kBM>;
    cudaFuncAttributes attr;
    int optin = 0;
    cudaError_t err = cudaFuncGetAttributes(&attr, kernel);
    if (err == cudaSuccess)
      err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    const size_t room = optin > static_cast<int>(attr.sharedSizeBytes)
                            ? static_cast<size_t>(optin) - attr.sharedSizeBytes : 0;
    if (err == cudaSuccess)
      err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                 static_cast<int>(room));
    if (err != cudaSuccess) cudaGetLastError();  // not sticky: the next op starts clean
    error[device] = err;
    limit[device] = room;
  });
  cuda_check(error[device], "mlp_cosine_reward_cuda: setting the shared-memory limit");
  return limit[device];
}

// The (kBM, P) output block lives in shared memory.
template <int kBM>
size_t mlp_smem(int p) { return static_cast<size_t>(kBM) * p * sizeof(float); }

template <typename T, int kBM>
void launch_mlp(const TensorView& emb, const TensorView& w1, const TensorView& b1,
                const TensorView& w2, const TensorView& b2, const TensorView& target,
                const TensorView& out, cudaStream_t stream) {
  const int64_t n = emb.shape[0];
  const int d = static_cast<int>(emb.shape[1]), h = static_cast<int>(w1.shape[1]);
  const int p = static_cast<int>(w2.shape[1]), k = static_cast<int>(target.shape[0]);
  const auto blocks = static_cast<unsigned>((n + kBM - 1) / kBM);
  mlp_cosine_reward_kernel<T, kBM><<<blocks, kThreads, mlp_smem<kBM>(p), stream>>>(
      emb.ptr<T>(), w1.ptr<float>(), b1.ptr<float>(), w2.ptr<float>(), b2.ptr<float>(),
      target.ptr<float>(), out.ptr<float>(), n, d, h, p, k);
  FURL_CUDA_CHECK_LAUNCH("mlp_cosine_reward_kernel");
}

template <typename T>
void dispatch_mlp(const TensorView& emb, const TensorView& w1, const TensorView& b1,
                  const TensorView& w2, const TensorView& b2, const TensorView& target,
                  const TensorView& out, int device, cudaStream_t stream) {
  int sms = 0;
  cuda_check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device),
             "cudaDeviceGetAttribute");
  const int p = static_cast<int>(w2.shape[1]);
  // Large batches take 32-row blocks (fewer re-reads of w1); small ones (a training batch of 256)
  // 16-row blocks so more SMs get work. A 32-row block needs twice the shared memory of a 16-row
  // one, so a wide P falls back to 16-row blocks at any N.
  if (emb.shape[0] >= static_cast<int64_t>(sms) * 32 * 2 &&
      mlp_smem<32>(p) <= mlp_dynamic_smem_limit<T, 32>(device)) {
    launch_mlp<T, 32>(emb, w1, b1, w2, b2, target, out, stream);
    return;
  }
  const size_t room = mlp_dynamic_smem_limit<T, 16>(device);
  if (mlp_smem<16>(p) > room)
    throw ValueError("mlp_cosine_reward_cuda: argument 'w2' has P = " + std::to_string(p) +
                     " output columns; the CUDA kernel keeps a (16, P) block in shared memory, "
                     "which needs P <= " + std::to_string(room / (16 * sizeof(float))) +
                     " on this GPU.");
  launch_mlp<T, 16>(emb, w1, b1, w2, b2, target, out, stream);
}

// ---- clip_similarity / softmax_goal_reward ----------------------------------------------------

enum class TextHead { kSimilarity, kSimilarityUnnormalised, kSoftmaxGoal };

struct TextParams {
  int64_t n;
  int d, k;
  int goal;
  float inv_temperature;
  bool has_threshold;
  float threshold;
};

template <typename T, TextHead kHead>
__global__ void __launch_bounds__(kThreads)
    text_similarity_kernel(const T* __restrict__ img, const float* __restrict__ text,
                           float* __restrict__ out, const TextParams tp) {
  extern __shared__ float inv_text_norm[];  // (k,)
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int d = tp.d, k = tp.k;
  for (int t = warp; t < k; t += kWarps) {
    float s = 0.f;
    for (int i = lane; i < d; i += 32) {
      const float v = text[static_cast<int64_t>(t) * d + i];
      s = fmaf(v, v, s);
    }
    s = warp_sum(s);
    if (lane == 0)
      inv_text_norm[t] = kHead == TextHead::kSimilarityUnnormalised ? 1.f : inv_norm(s);
  }
  __syncthreads();

  const int64_t warps_total = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + warp; row < tp.n;
       row += warps_total) {
    const T* x = img + row * d;
    float inv_x = 1.f;
    float run_max = -INFINITY, run_sum = 0.f, goal_logit = 0.f;  // online softmax
    for (int t0 = 0; t0 < k; t0 += kTextChunk) {
      float acc[kTextChunk], xx = 0.f;
#pragma unroll
      for (int c = 0; c < kTextChunk; ++c) acc[c] = 0.f;
      for (int i = lane; i < d; i += 32) {
        const float v = to_float(x[i]);
        xx = fmaf(v, v, xx);
#pragma unroll
        for (int c = 0; c < kTextChunk; ++c)
          if (t0 + c < k) acc[c] = fmaf(v, text[static_cast<int64_t>(t0 + c) * d + i], acc[c]);
      }
      if (t0 == 0 && kHead != TextHead::kSimilarityUnnormalised) inv_x = inv_norm(warp_sum(xx));
#pragma unroll
      for (int c = 0; c < kTextChunk; ++c) {
        const int t = t0 + c;
        if (t >= k) break;
        const float sim = warp_sum(acc[c]) * inv_x * inv_text_norm[t];
        if (kHead == TextHead::kSoftmaxGoal) {
          const float logit = sim * tp.inv_temperature;
          const float new_max = fmaxf(run_max, logit);
          run_sum = run_sum * expf(run_max - new_max) + expf(logit - new_max);
          run_max = new_max;
          if (t == tp.goal) goal_logit = logit;
        } else if (lane == c) {
          out[row * k + t] = sim;
        }
      }
    }
    if (kHead == TextHead::kSoftmaxGoal && lane == 0) {
      // A NaN logit makes run_sum NaN (fmaxf skips it, expf does not), so NaN propagates.
      const float prob = expf(goal_logit - run_max) / run_sum;
      out[row] = !tp.has_threshold || isnan(prob) ? prob : (prob > tp.threshold ? 1.f : 0.f);
    }
  }
}

int grid_for_rows(int64_t n) {
  int device = 0, sms = 0;
  cuda_check(cudaGetDevice(&device), "cudaGetDevice");
  cuda_check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device),
             "cudaDeviceGetAttribute");
  // Enough resident warps to saturate memory bandwidth, few enough blocks to amortise set-up.
  const int64_t blocks = std::min<int64_t>((n + kWarps - 1) / kWarps, int64_t{sms} * 8);
  return static_cast<int>(std::max<int64_t>(1, blocks));
}

template <TextHead kHead>
void launch_text(const char* op, const TensorView& img, const TensorView& text,
                 const TensorView& out, const TextParams& tp, cudaStream_t stream) {
  const int grid = grid_for_rows(tp.n);
  const size_t smem = static_cast<size_t>(tp.k) * sizeof(float);  // one inverse norm per text
  if (smem > 48 * 1024)
    throw ValueError(std::string(op) + ": argument 'text_emb' has " + std::to_string(tp.k) +
                     " rows; the CUDA kernel supports at most 12288.");
  switch (img.dtype) {
    case DType::kFloat32:
      text_similarity_kernel<float, kHead><<<grid, kThreads, smem, stream>>>(
          img.ptr<float>(), text.ptr<float>(), out.ptr<float>(), tp);
      break;
    case DType::kFloat16:
      text_similarity_kernel<__half, kHead><<<grid, kThreads, smem, stream>>>(
          img.ptr<__half>(), text.ptr<float>(), out.ptr<float>(), tp);
      break;
    default:
      text_similarity_kernel<__nv_bfloat16, kHead><<<grid, kThreads, smem, stream>>>(
          img.ptr<__nv_bfloat16>(), text.ptr<float>(), out.ptr<float>(), tp);
  }
  FURL_CUDA_CHECK_LAUNCH("text_similarity_kernel");
}

// D and K are ints in the kernels: larger ones are refused before the cast.
void check_int_range(const char* op, const char* what, int64_t v) {
  if (v > INT32_MAX)
    throw ValueError(std::string(op) + ": " + what + " = " + std::to_string(v) +
                     " must be below 2^31 for the CUDA kernel.");
}

TextParams text_params(const char* op, const TensorView& img, const TensorView& text) {
  check_int_range(op, "D (the embedding width)", img.shape[1]);
  check_int_range(op, "K (the number of texts)", text.shape[0]);
  TextParams tp{};
  tp.n = img.shape[0];
  tp.d = static_cast<int>(img.shape[1]);
  tp.k = static_cast<int>(text.shape[0]);
  return tp;
}

// ---- goal_baseline_reward ---------------------------------------------------------------------

struct GoalParams {
  int64_t n;
  int d;
  float alpha;
};

template <typename T>
__global__ void __launch_bounds__(kThreads)
    goal_baseline_reward_kernel(const T* __restrict__ img, const float* __restrict__ goal,
                                const float* __restrict__ baseline, float* __restrict__ out,
                                const GoalParams gp) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int d = gp.d;
  // |g|^2, g.d and |d|^2 with d = g - b: every warp computes them (D multiply-adds per lane / 32),
  // which costs less than a block-wide reduction and a barrier.
  float gg = 0.f, gd = 0.f, dd = 0.f;
  for (int i = lane; i < d; i += 32) {
    const float g = goal[i], dv = g - baseline[i];
    gg = fmaf(g, g, gg);
    gd = fmaf(g, dv, gd);
    dd = fmaf(dv, dv, dd);
  }
  gg = warp_sum(gg);
  gd = warp_sum(gd);
  dd = warp_sum(dd);
  const float inv_d = inv_norm(dd), uu = dd * inv_d * inv_d, a = gp.alpha;
  const float c_s = a * a * uu + 2.f * a * (1.f - a), c_v = (1.f - a) * (1.f - a);

  const int64_t warps_total = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + warp; row < gp.n;
       row += warps_total) {
    const T* x = img + row * d;
    float xx = 0.f, xg = 0.f, xd = 0.f;
    for (int i = lane; i < d; i += 32) {
      const float v = to_float(x[i]), g = goal[i];
      xx = fmaf(v, v, xx);
      xg = fmaf(v, g, xg);
      xd = fmaf(v, g - baseline[i], xd);
    }
    xx = warp_sum(xx);
    xg = warp_sum(xg);
    xd = warp_sum(xd);
    if (lane == 0) {
      const float inv_x = inv_norm(xx);
      const float s = (xd * inv_x - gd) * inv_d;                  // (x - g).u
      const float vv = xx * inv_x * inv_x - 2.f * xg * inv_x + gg;  // |x - g|^2
      out[row] = 1.f - 0.5f * (c_s * s * s + c_v * vv);
    }
  }
}

}  // namespace

void mlp_cosine_reward_cuda(const TensorView& emb, const TensorView& w1, const TensorView& b1,
                            const TensorView& w2, const TensorView& b2, const TensorView& target,
                            const TensorView& out, uintptr_t stream) {
  check_mlp_cosine_args("mlp_cosine_reward_cuda", emb, w1, b1, w2, b2, target, out,
                        DeviceKind::kCUDA);
  if (emb.shape[1] > INT32_MAX || w1.shape[1] > INT32_MAX || w2.shape[1] > INT32_MAX ||
      target.shape[0] > INT32_MAX)
    throw ValueError("mlp_cosine_reward_cuda: D, H, P and K must each be below 2^31.");
  CudaDeviceGuard guard(emb.device_index);
  const cudaStream_t s = cuda_stream(stream);
  const int dev = emb.device_index;
  switch (emb.dtype) {
    case DType::kFloat32: dispatch_mlp<float>(emb, w1, b1, w2, b2, target, out, dev, s); break;
    case DType::kFloat16: dispatch_mlp<__half>(emb, w1, b1, w2, b2, target, out, dev, s); break;
    default: dispatch_mlp<__nv_bfloat16>(emb, w1, b1, w2, b2, target, out, dev, s); break;
  }
}

void clip_similarity_cuda(const TensorView& img, const TensorView& text, const TensorView& out,
                          const ClipSimilarityParams& p, uintptr_t stream) {
  check_text_similarity_args("clip_similarity_cuda", img, text, out, 2, DeviceKind::kCUDA);
  CudaDeviceGuard guard(img.device_index);
  const TextParams tp = text_params("clip_similarity_cuda", img, text);
  const auto s = cuda_stream(stream);
  if (p.normalize)
    launch_text<TextHead::kSimilarity>("clip_similarity_cuda", img, text, out, tp, s);
  else
    launch_text<TextHead::kSimilarityUnnormalised>("clip_similarity_cuda", img, text, out, tp, s);
}

void softmax_goal_reward_cuda(const TensorView& img, const TensorView& text, const TensorView& out,
                              const SoftmaxGoalParams& p, uintptr_t stream) {
  check_text_similarity_args("softmax_goal_reward_cuda", img, text, out, 1, DeviceKind::kCUDA);
  check_softmax_goal_params("softmax_goal_reward_cuda", p, text.shape[0]);
  CudaDeviceGuard guard(img.device_index);
  TextParams tp = text_params("softmax_goal_reward_cuda", img, text);
  tp.goal = static_cast<int>(p.goal_index);
  tp.inv_temperature = 1.f / p.temperature;
  tp.has_threshold = p.has_threshold;
  tp.threshold = p.threshold;
  launch_text<TextHead::kSoftmaxGoal>("softmax_goal_reward_cuda", img, text, out, tp,
                                      cuda_stream(stream));
}

void goal_baseline_reward_cuda(const TensorView& img, const TensorView& goal,
                               const TensorView& baseline, const TensorView& out,
                               const GoalBaselineParams& p, uintptr_t stream) {
  check_goal_baseline_args("goal_baseline_reward_cuda", img, goal, baseline, out, p,
                           DeviceKind::kCUDA);
  check_int_range("goal_baseline_reward_cuda", "D (the embedding width)", img.shape[1]);
  CudaDeviceGuard guard(img.device_index);
  const GoalParams gp{img.shape[0], static_cast<int>(img.shape[1]), p.alpha};
  const int grid = grid_for_rows(gp.n);
  const auto s = cuda_stream(stream);
  switch (img.dtype) {
    case DType::kFloat32:
      goal_baseline_reward_kernel<float><<<grid, kThreads, 0, s>>>(
          img.ptr<float>(), goal.ptr<float>(), baseline.ptr<float>(), out.ptr<float>(), gp);
      break;
    case DType::kFloat16:
      goal_baseline_reward_kernel<__half><<<grid, kThreads, 0, s>>>(
          img.ptr<__half>(), goal.ptr<float>(), baseline.ptr<float>(), out.ptr<float>(), gp);
      break;
    default:
      goal_baseline_reward_kernel<__nv_bfloat16><<<grid, kThreads, 0, s>>>(
          img.ptr<__nv_bfloat16>(), goal.ptr<float>(), baseline.ptr<float>(), out.ptr<float>(), gp);
  }
  FURL_CUDA_CHECK_LAUNCH("goal_baseline_reward_kernel");
}

}  // namespace furl_fast
