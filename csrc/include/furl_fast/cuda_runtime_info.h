// What the statically linked CUDA runtime sees; safe to call on machines without a driver.
#pragma once

#include <string>

namespace furl_fast {

struct CudaRuntimeInfo {
  int runtime_version = 0;  // e.g. 13000 for CUDA 13.0
  int device_count = 0;
  std::string error;  // why no device is usable, when device_count == 0
};

#ifdef FURL_FAST_WITH_CUDA
CudaRuntimeInfo cuda_runtime_info();
#endif

}  // namespace furl_fast
