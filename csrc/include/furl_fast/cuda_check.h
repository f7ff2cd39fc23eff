// Included by .cu files only: error checking and the device guard for kernels launched from Python.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace furl_fast {

inline void cuda_check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string(what) + " failed: " + cudaGetErrorString(err));
}

// Every launch is checked at once, so a bad configuration surfaces at the op that caused it.
#define FURL_CUDA_CHECK_LAUNCH(name) ::furl_fast::cuda_check(cudaGetLastError(), name " launch")

// The stream torch hands over (torch.cuda.current_stream().cuda_stream). 0 is torch's default
// stream, the legacy one; it is named explicitly, so a build with --default-stream per-thread
// cannot move the launch to a per-thread stream the caller never waits for.
inline cudaStream_t cuda_stream(uintptr_t stream) {
  return stream == 0 ? cudaStreamLegacy : reinterpret_cast<cudaStream_t>(stream);
}

// Makes the tensor's device current for the launch and, only when it had to change it, restores
// the caller's device afterwards: a thread whose current device was never set keeps it unset
// (restoring "device 0" there would create a context on GPU 0), and a failed restore does not
// leave a sticky error for the next op's launch check.
class CudaDeviceGuard {
 public:
  explicit CudaDeviceGuard(int device) {
    cuda_check(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device) {
      cuda_check(cudaSetDevice(device), "cudaSetDevice");
      changed_ = true;
    }
  }
  ~CudaDeviceGuard() {
    if (changed_ && cudaSetDevice(previous_) != cudaSuccess) cudaGetLastError();
  }
  CudaDeviceGuard(const CudaDeviceGuard&) = delete;
  CudaDeviceGuard& operator=(const CudaDeviceGuard&) = delete;

 private:
  int previous_ = 0;
  bool changed_ = false;
};

}  // namespace furl_fast
