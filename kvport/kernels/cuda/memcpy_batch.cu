// memcpy_batch: many (dst, src, size) regions through the copy engines, no SMs used (the planner's DMA path).
// One cudaMemcpyBatchAsync on CUDA >= 12.8; per-region async copies otherwise and on HIP (see below).
#include <vector>

#include "ops.h"
#include "vendor.h"

// KVPORT_BATCHED_MEMCPY (vendor.h / hip/compat.h) says whether this build has the batched call.

namespace kvport {

#if KVPORT_BATCHED_MEMCPY
static cudaError_t one_batch(const std::uintptr_t* dsts, const std::uintptr_t* srcs, const std::size_t* sizes,
                             std::size_t count, bool overlap, cudaStream_t s) {
  cudaMemcpyAttributes attr = {};
  // Stream order: the sources were written by earlier work on this stream (the engine's forward pass).
  attr.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
  attr.flags = overlap ? cudaMemcpyFlagPreferOverlapWithCompute : 0;
  std::size_t attr_index = 0;
#if CUDART_VERSION >= 13000
  return cudaMemcpyBatchAsync(reinterpret_cast<void* const*>(dsts), reinterpret_cast<const void* const*>(srcs), sizes,
                              count, &attr, &attr_index, 1, s);
#else
  std::size_t fail_index = 0;
  return cudaMemcpyBatchAsync(reinterpret_cast<void**>(const_cast<std::uintptr_t*>(dsts)),
                              reinterpret_cast<void**>(const_cast<std::uintptr_t*>(srcs)),
                              const_cast<std::size_t*>(sizes), count, &attr, &attr_index, 1, &fail_index, s);
#endif
}
#endif

const char* memcpy_batch(const std::uintptr_t* dsts, const std::uintptr_t* srcs, const std::size_t* sizes,
                         std::size_t count, std::uintptr_t stream, bool batched, std::size_t max_batch, bool overlap) {
  if (count == 0) return nullptr;
  auto s = reinterpret_cast<cudaStream_t>(stream);
#if KVPORT_BATCHED_MEMCPY
  if (batched) {
    // Calls of at most max_batch regions (0: one call for all): the copy engines start on the first call while
    // the host describes the next.
    const std::size_t step = max_batch ? max_batch : count;
    for (std::size_t first = 0; first < count; first += step) {
      const std::size_t n = count - first < step ? count - first : step;
      cudaError_t err = one_batch(dsts + first, srcs + first, sizes + first, n, overlap, s);
      if (err != cudaSuccess) return cudaGetErrorString(err);
    }
    return nullptr;
  }
#endif
  (void)max_batch;
  (void)overlap;
  // Builds without the batched call (HIP, CUDA < 12.8; see KVPORT_BATCHED_MEMCPY) and calls with batched=false
  // take one async copy per region.
  (void)batched;
  for (std::size_t i = 0; i < count; ++i) {
    cudaError_t err = cudaMemcpyAsync(reinterpret_cast<void*>(dsts[i]), reinterpret_cast<const void*>(srcs[i]),
                                      sizes[i], cudaMemcpyDefault, s);
    if (err != cudaSuccess) return cudaGetErrorString(err);
  }
  return nullptr;
}

const char* memcpy_template(const RegionTemplateArgs& a) {
  // Per-thread scratch: the batched call consumes the host arrays before it returns, so they are reused.
  thread_local std::vector<std::uintptr_t> dsts, srcs;
  thread_local std::vector<std::size_t> sizes;
  dsts.clear();
  srcs.clear();
  sizes.clear();
  if (const char* e = wait_for_stream(a.stream, a.after)) return e;
  for (std::size_t i = 0; i < a.count; ++i) {
    const std::int64_t pos = a.block_pos[i];
    if (pos < 0 || static_cast<std::size_t>(pos) >= a.n_ids) return "memcpy_template: block position out of range";
    const std::uintptr_t eng = static_cast<std::uintptr_t>(a.eng_base[i] + a.flat_ids[pos] * a.block_stride[i]);
    const std::uintptr_t can = a.chunk_ptr + static_cast<std::uintptr_t>(a.can_off[i]);
    const std::size_t n = static_cast<std::size_t>(a.size[i]);
    const std::uintptr_t dst = a.to_host ? can : eng;
    const std::uintptr_t src = a.to_host ? eng : can;
    // Join runs that continue exactly on both sides (consecutive block ids): fewer, larger copies.
    if (!sizes.empty() && dsts.back() + sizes.back() == dst && srcs.back() + sizes.back() == src) {
      sizes.back() += n;
      continue;
    }
    dsts.push_back(dst);
    srcs.push_back(src);
    sizes.push_back(n);
  }
  return memcpy_batch(dsts.data(), srcs.data(), sizes.data(), sizes.size(), a.stream, true, a.max_batch, a.overlap);
}

bool has_batched_memcpy() { return KVPORT_BATCHED_MEMCPY != 0; }

}  // namespace kvport
