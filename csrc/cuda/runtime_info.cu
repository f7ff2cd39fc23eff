#include <cuda_runtime.h>

#include "furl_fast/cuda_runtime_info.h"

namespace furl_fast {

CudaRuntimeInfo cuda_runtime_info() {
  CudaRuntimeInfo info;
  cudaRuntimeGetVersion(&info.runtime_version);
  if (cudaDriverGetVersion(&info.driver_version) != cudaSuccess) info.driver_version = 0;
  const cudaError_t err = cudaGetDeviceCount(&info.device_count);
  if (err != cudaSuccess) {
    info.device_count = 0;
    info.error_code = static_cast<int>(err);
    info.error = cudaGetErrorString(err);
    cudaGetLastError();  // clear the sticky-free error so later calls start clean
  } else if (info.device_count == 0) {
    info.error = "no CUDA device found";
  }
  return info;
}

int cuda_build_runtime_version() { return CUDART_VERSION; }

}  // namespace furl_fast
