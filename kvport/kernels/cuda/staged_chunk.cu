// staged_chunk: one single-piece staged chunk issued in one host call, in stream order. Gather: block ids up, the
// plan's launches into device staging, one copy to the host chunk; scatter: ids up, one copy into staging, launches.
#include <cstring>

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

// `s` waits for what `o.stream` has queued so far, if anything: an idle stream costs one query, no wait (each
// cross-stream wait cost the copy engines ~1% of a back-to-back chunk, docs/performance.md).
const char* wait_for(cudaStream_t s, const StreamOrder& o) {
  if (o.event == 0) return nullptr;
  auto other = reinterpret_cast<cudaStream_t>(o.stream);
  cudaError_t err = cudaStreamQuery(other);
  if (err == cudaSuccess) return nullptr;
  if (err != cudaErrorNotReady) return cudaGetErrorString(err);
  auto event = reinterpret_cast<cudaEvent_t>(o.event);
  if ((err = cudaEventRecord(event, other)) != cudaSuccess) return cudaGetErrorString(err);
  err = cudaStreamWaitEvent(s, event, 0);
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace

const char* staged_chunk(const StagedChunkArgs& a) {
  auto s = reinterpret_cast<cudaStream_t>(a.stream);
  if (const char* e = wait_for(s, a.after)) return e;
  if (const char* e = wait_for(s, a.busy)) return e;
  const std::size_t ids_bytes = a.n_ids * sizeof(std::int64_t);
  std::memcpy(reinterpret_cast<void*>(a.ids_host), a.ids, ids_bytes);
  if (const char* e = copy(a.ids_dev, a.ids_host, ids_bytes, s)) return e;
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
