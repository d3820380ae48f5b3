// The one vendor switch for kvport's native kernels: CUDA by default, HIP through ../hip/compat.h.
// Kernels include only this header for runtime APIs; they never test the vendor themselves.
#pragma once

#if defined(KVPORT_HIP)
#include "../hip/compat.h"
#else
#include <cuda_runtime.h>
#define KVPORT_WARP_SIZE 32
// cudaMemcpyBatchAsync (many regions, one call, copy engines only) exists from CUDA 12.8.
#if defined(CUDART_VERSION) && CUDART_VERSION >= 12080
#define KVPORT_BATCHED_MEMCPY 1
#else
#define KVPORT_BATCHED_MEMCPY 0
#endif
#endif

#include <cstddef>
#include <cstdint>
