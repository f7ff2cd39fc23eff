// GPU mode of the replay buffer: frames live in device memory; the host core plans each batch
// (which slots form each stack, which shift) and this kernel gathers + shifts in one pass, so a GPU
// training loop never copies frames from the host. Equivalent: the CPU gather in
// csrc/replay/replay.cpp, and reference.random_shift for the shift.
#include <cuda_runtime.h>

#include <algorithm>

#include "furl_fast/cuda_check.h"
#include "furl_fast/replay.h"

namespace furl_fast {
namespace {

__device__ __forceinline__ int64_t clamp_coord(int64_t v, int64_t size) {
  return v < 0 ? 0 : (v >= size ? size - 1 : v);
}

// One thread per output byte, grid-stride: consecutive threads read consecutive bytes of a source
// row (coalesced) and the kernel is memory-bound at these frame sizes.
__global__ void random_shift_kernel(const uint8_t* __restrict__ frames,
                                            const int64_t* __restrict__ slots,
                                            const int32_t* __restrict__ shifts,
                                            uint8_t* __restrict__ out, int64_t capacity,
                                            int64_t batch, int64_t stack, int64_t channels,
                                            int64_t height, int64_t width, int64_t pad) {
  const int64_t plane = height * width;
  const int64_t total = batch * stack * channels * plane;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t x = i % width;
    const int64_t y = (i / width) % height;
    const int64_t c = (i / plane) % channels;
    const int64_t f = (i / (plane * channels)) % stack;
    const int64_t b = i / (plane * channels * stack);
    const int64_t slot = slots[b * stack + f];
    if (slot < 0 || slot >= capacity) {  // never read out of bounds, whatever the caller passes
      out[i] = 0;
      continue;
    }
    // The same (x, y) shift for every frame of the stack (DrQ shifts the stacked observation).
    const int64_t xs = clamp_coord(x + shifts[b * 2] - pad, width);
    const int64_t ys = clamp_coord(y + shifts[b * 2 + 1] - pad, height);
    out[i] = frames[((slot * channels + c) * height + ys) * width + xs];
  }
}

}  // namespace

void random_shift_cuda(const TensorView& frames, const TensorView& slots, const TensorView& shifts,
                       const TensorView& out, int64_t pad, uintptr_t stream) {
  check_random_shift_args("random_shift_cuda", frames, slots, shifts, out, pad, DeviceKind::kCUDA);
  const int64_t capacity = frames.shape[0], channels = frames.shape[1], height = frames.shape[2],
                width = frames.shape[3], batch = slots.shape[0], stack = slots.shape[1];
  CudaDeviceGuard guard(frames.device_index);
  const int threads = 256;
  const int64_t total = out.numel();
  // At most 65,535 blocks: the kernel's grid-stride loop covers the rest.
  const int blocks = static_cast<int>(std::min<int64_t>((total + threads - 1) / threads, 65535));
  random_shift_kernel<<<blocks, threads, 0, cuda_stream(stream)>>>(
      frames.ptr<uint8_t>(), slots.ptr<int64_t>(), shifts.ptr<int32_t>(), out.ptr<uint8_t>(),
      capacity, batch, stack, channels, height, width, pad);
  FURL_CUDA_CHECK_LAUNCH("random_shift_kernel");
}

void replay_copy_to_device_cuda(void* dst, const void* src, int64_t bytes, int device,
                                uintptr_t stream) {
  CudaDeviceGuard guard(device);
  const cudaStream_t s = cuda_stream(stream);
  // cudaMemcpyDefault: the source may be host memory or the buffer's own GPU (unified addressing).
  cuda_check(cudaMemcpyAsync(dst, src, static_cast<size_t>(bytes), cudaMemcpyDefault, s),
             "replay buffer cudaMemcpyAsync");
  // The caller may free or reuse a host source as soon as add() returns, so a copy from host memory
  // (pinned memory is read asynchronously) is waited for. A device source (the Python facade stages
  // host frames onto the GPU first) is not: torch frees device memory in stream order, so the
  // copy, queued on the same stream, runs before the memory can be reused, and an env step does
  // not wait for the training kernels queued before it.
  cudaPointerAttributes attr;
  const bool device_source = cudaPointerGetAttributes(&attr, src) == cudaSuccess &&
                             (attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged);
  cudaGetLastError();  // an unregistered host pointer may leave an error behind on old runtimes
  if (!device_source)
    cuda_check(cudaStreamSynchronize(s), "replay buffer cudaStreamSynchronize");
}

}  // namespace furl_fast
