// The one vendor switch for kvport's native kernels: CUDA by default, HIP through ../hip/compat.h.
// Kernels include only this header for runtime APIs; they never test the vendor themselves.
#pragma once

#if defined(KVPORT_HIP)
#include "../hip/compat.h"
#else
#include <cuda_runtime.h>
#define KVPORT_WARP_SIZE 32
#endif

#include <cstddef>
#include <cstdint>
