// memcpy_batch: many (dst, src, size) regions through the copy engines, no SMs used (the planner's DMA path).
// One cudaMemcpyBatchAsync on CUDA >= 12.8; per-region async copies otherwise and on HIP (see below).
#include "ops.h"
#include "vendor.h"

// One place decides whether this build has the batched call; memcpy_batch and has_batched_memcpy both read it.
#if !defined(KVPORT_HIP) && defined(CUDART_VERSION) && CUDART_VERSION >= 12080
#define KVPORT_BATCHED_MEMCPY 1
#else
#define KVPORT_BATCHED_MEMCPY 0
#endif

namespace kvport {

const char* memcpy_batch(const std::uintptr_t* dsts, const std::uintptr_t* srcs, const std::size_t* sizes,
                         std::size_t count, std::uintptr_t stream, bool batched) {
  if (count == 0) return nullptr;
  auto s = reinterpret_cast<cudaStream_t>(stream);
#if KVPORT_BATCHED_MEMCPY
  if (batched) {
    cudaMemcpyAttributes attr = {};
    // Stream order: the sources were written by earlier work on this stream (the engine's forward pass).
    attr.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
    attr.flags = cudaMemcpyFlagPreferOverlapWithCompute;
    std::size_t attr_index = 0;
#if CUDART_VERSION >= 13000
    cudaError_t err = cudaMemcpyBatchAsync(reinterpret_cast<void* const*>(dsts), reinterpret_cast<const void* const*>(srcs),
                                           sizes, count, &attr, &attr_index, 1, s);
#else
    std::size_t fail_index = 0;
    cudaError_t err = cudaMemcpyBatchAsync(reinterpret_cast<void**>(const_cast<std::uintptr_t*>(dsts)),
                                           reinterpret_cast<void**>(const_cast<std::uintptr_t*>(srcs)),
                                           const_cast<std::size_t*>(sizes), count, &attr, &attr_index, 1,
                                           &fail_index, s);
#endif
    return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
  }
#endif
  // HIP: the batched call is unreliable before ROCm 7.14 (issue 4), and Debian's hipcc headers predate it,
  // so ROCm always takes per-region copies here.
  (void)batched;
  for (std::size_t i = 0; i < count; ++i) {
    cudaError_t err = cudaMemcpyAsync(reinterpret_cast<void*>(dsts[i]), reinterpret_cast<const void*>(srcs[i]),
                                      sizes[i], cudaMemcpyDefault, s);
    if (err != cudaSuccess) return cudaGetErrorString(err);
  }
  return nullptr;
}

bool has_batched_memcpy() { return KVPORT_BATCHED_MEMCPY != 0; }

}  // namespace kvport
