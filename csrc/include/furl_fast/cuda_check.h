// Included by .cu files only: error checking and the device guard for kernels launched from Python.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace furl_fast {

inline void cuda_check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string(what) + " failed: " + cudaGetErrorString(err));
}

// Every launch is checked at once, so a bad configuration surfaces at the op that caused it.
#define FURL_CUDA_CHECK_LAUNCH(name) ::furl_fast::cuda_check(cudaGetLastError(), name " launch")

// Makes the tensor's device current for the launch and restores the caller's device afterwards.
class CudaDeviceGuard {
 public:
  explicit CudaDeviceGuard(int device) {
    cuda_check(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device) cuda_check(cudaSetDevice(device), "cudaSetDevice");
  }
  ~CudaDeviceGuard() { cudaSetDevice(previous_); }
  CudaDeviceGuard(const CudaDeviceGuard&) = delete;
  CudaDeviceGuard& operator=(const CudaDeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

}  // namespace furl_fast
