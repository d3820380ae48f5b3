// stream_order: a stream waits for what another has queued so far, only if it has anything left (the one-call
// staged chunk and the DMA chunk order themselves after the engine's stream this way, in their one host call).
#include "ops.h"
#include "vendor.h"

namespace kvport {

// An idle stream costs one query and no wait: each cross-stream wait cost the copy engines ~1% of a back-to-back
// chunk (docs/performance.md).
const char* wait_for_stream(std::uintptr_t s, const StreamOrder& o) {
  if (o.event == 0) return nullptr;
  auto other = reinterpret_cast<cudaStream_t>(o.stream);
  auto event = reinterpret_cast<cudaEvent_t>(o.event);
  cudaError_t err = cudaStreamQuery(other);
  if (err == cudaSuccess) return nullptr;
  if (err != cudaErrorNotReady) return cudaGetErrorString(err);
  err = cudaEventRecord(event, other);
  if (err == cudaSuccess) err = cudaStreamWaitEvent(reinterpret_cast<cudaStream_t>(s), event, 0);
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace kvport
