// staged_chunk: one single-piece staged chunk issued in one host call, in stream order. Gather: block ids up, the
// plan's launches into device staging, one copy to the host chunk; scatter: ids up, one copy into staging, launches.
#include "ops.h"
#include "vendor.h"

namespace kvport {

namespace {

const char* copy(std::uintptr_t dst, std::uintptr_t src, std::size_t nbytes, cudaStream_t s) {
  // cudaMemcpyDefault: unified addressing tells pinned host from device memory.
  cudaError_t err = cudaMemcpyAsync(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), nbytes,
                                    cudaMemcpyDefault, s);
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace

const char* staged_chunk(const StagedChunkArgs& a) {
  auto s = reinterpret_cast<cudaStream_t>(a.stream);
  if (const char* e = copy(a.ids_dev, a.ids_host, a.ids_bytes, s)) return e;
  if (!a.gather) {
    if (const char* e = copy(a.staging, a.host, a.nbytes, s)) return e;
  }
  for (std::size_t i = 0; i < a.n_launches; ++i) {
    const std::int64_t* p = a.launches + kStagedLaunchColumns * i;
    const SegmentArgs seg{static_cast<std::uintptr_t>(p[0]), p[1], a.ids_dev, a.staging, static_cast<int>(p[2]),
                          p[3], 0, a.stream};
    if (const char* e = a.gather ? gather(seg) : scatter(seg)) return e;
  }
  if (a.gather) {
    if (const char* e = copy(a.host, a.staging, a.nbytes, s)) return e;
  }
  return nullptr;
}

}  // namespace kvport
