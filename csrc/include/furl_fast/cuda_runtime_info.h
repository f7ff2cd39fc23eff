// What the statically linked CUDA runtime sees; safe to call on machines without a driver. It
// initialises the driver, which fixes CUDA_VISIBLE_DEVICES for the process: call it lazily (from
// Python only when a CUDA kernel is about to be used), never at import.
#pragma once

#include <string>

namespace furl_fast {

struct CudaRuntimeInfo {
  int runtime_version = 0;  // e.g. 13000 for CUDA 13.0
  int driver_version = 0;   // the CUDA version the driver supports; 0 when no driver is installed
  int device_count = 0;
  int error_code = 0;       // the cudaError_t of cudaGetDeviceCount
  std::string error;        // its message, when device_count == 0
};

#ifdef FURL_FAST_WITH_CUDA
CudaRuntimeInfo cuda_runtime_info();
// CUDART_VERSION of the runtime linked in (no driver call).
int cuda_build_runtime_version();
#endif

}  // namespace furl_fast
