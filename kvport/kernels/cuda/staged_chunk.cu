// staged_chunk: one single-piece staged chunk issued in one host call. Gather: block ids up, the plan's launches
// into a device staging slot (kernel stream), one copy to the host chunk (copy stream); scatter: one copy into the
// slot (copy stream), ids up and the launches (kernel stream). Events hand the slot between the two streams.
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

const char* check(cudaError_t err) { return err == cudaSuccess ? nullptr : cudaGetErrorString(err); }

cudaEvent_t event_of(std::uintptr_t handle) { return reinterpret_cast<cudaEvent_t>(handle); }

// `to` continues after what `from` has queued so far.
const char* hand_over(cudaStream_t from, cudaStream_t to, std::uintptr_t event) {
  if (const char* e = check(cudaEventRecord(event_of(event), from))) return e;
  return check(cudaStreamWaitEvent(to, event_of(event), 0));
}

const char* wait_for(cudaStream_t s, const StreamOrder& o) {
  return wait_for_stream(reinterpret_cast<std::uintptr_t>(s), o);
}

const char* launch_all(const StagedChunkArgs& a) {
  for (std::size_t i = 0; i < a.n_launches; ++i) {
    const std::int64_t* p = a.launches + kStagedLaunchColumns * i;
    const SegmentArgs seg{static_cast<std::uintptr_t>(p[0]), p[1], a.ids_dev, a.staging, static_cast<int>(p[2]),
                          p[3], 0, a.kernel_stream};
    if (const char* e = a.gather ? gather(seg) : scatter(seg)) return e;
  }
  return nullptr;
}

const char* upload_ids(const StagedChunkArgs& a, cudaStream_t s) {
  const std::size_t ids_bytes = a.n_ids * sizeof(std::int64_t);
  std::memcpy(reinterpret_cast<void*>(a.ids_host), a.ids, ids_bytes);
  return copy(a.ids_dev, a.ids_host, ids_bytes, s);
}

}  // namespace

const char* staged_chunk(const StagedChunkArgs& a) {
  auto kernels = reinterpret_cast<cudaStream_t>(a.kernel_stream);
  auto copies = reinterpret_cast<cudaStream_t>(a.copy_stream);
  // The ids go up before the waits: the upload depends only on the kernel stream's order (the device buffer is
  // reused in it, BlockIdRing), so at the engine's boundary the kernels are ready at once instead of behind a copy.
  // H200, two A/B rounds per build (docs/performance.md, "Asynchronous stores"): the next step's wait 1-3 us
  // shorter and one-chunk stores +0.01-0.02 of memcpy in 7 of 8 layout-round pairs.
  if (const char* e = upload_ids(a, kernels)) return e;
  if (a.gather) {
    if (const char* e = wait_for(kernels, a.after)) return e;
    if (const char* e = check(cudaStreamWaitEvent(kernels, event_of(a.freed_event), 0))) return e;
    if (const char* e = launch_all(a)) return e;
    if (const char* e = hand_over(kernels, copies, a.filled_event)) return e;
    if (const char* e = copy(a.host, a.staging, a.nbytes, copies)) return e;
    return check(cudaEventRecord(event_of(a.freed_event), copies));
  }
  if (const char* e = check(cudaStreamWaitEvent(copies, event_of(a.freed_event), 0))) return e;
  if (const char* e = copy(a.staging, a.host, a.nbytes, copies)) return e;
  if (const char* e = check(cudaEventRecord(event_of(a.filled_event), copies))) return e;
  if (const char* e = wait_for(kernels, a.after)) return e;
  if (const char* e = check(cudaStreamWaitEvent(kernels, event_of(a.filled_event), 0))) return e;
  if (const char* e = launch_all(a)) return e;
  return check(cudaEventRecord(event_of(a.freed_event), kernels));
}

}  // namespace kvport
