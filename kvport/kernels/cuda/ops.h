// Host entry points of the native module, in plain C types so bindings.cpp needs no vendor header.
// Each returns nullptr on success or a static error string from the runtime.
#pragma once

#include <cstddef>
#include <cstdint>

namespace kvport {

// Copies nbytes from src to dst (device or device-mapped host addresses) with a kernel on `stream`.
const char* copy_bytes(std::uintptr_t dst, std::uintptr_t src, std::size_t nbytes, std::uintptr_t stream);

// Runtime facts for `kvport doctor`: device count and runtime/driver versions (0 when unknown).
const char* runtime_info(int* device_count, int* runtime_version, int* driver_version);

// One segment-copy launch over a table compiled by kvport/hal/transfer/segments.py (anchor 0).
// table/blocks are device addresses of int64 arrays; chunk is the canonical chunk's device-visible address
// (device memory, or pinned host memory's mapped address for zero-copy). max_ctas > 0 bounds the grid.
struct SegmentArgs {
  std::uintptr_t table;
  std::int64_t n_streams;
  std::uintptr_t blocks;
  std::uintptr_t chunk;
  int width;
  std::int64_t max_tiles;
  std::int64_t max_ctas;
  std::uintptr_t stream;
};

// Engine memory -> canonical chunk.
const char* gather(const SegmentArgs& args);

// Canonical chunk -> engine memory (only the addressed slots).
const char* scatter(const SegmentArgs& args);

// Copy engine transfer of `count` regions (host arrays of addresses and sizes), in stream order.
// batched: cudaMemcpyBatchAsync calls of at most max_batch regions (0: one call) where the runtime has it
// (CUDA >= 12.8), else per-region async copies; overlap sets cudaMemcpyFlagPreferOverlapWithCompute.
const char* memcpy_batch(const std::uintptr_t* dsts, const std::uintptr_t* srcs, const std::size_t* sizes,
                         std::size_t count, std::uintptr_t stream, bool batched, std::size_t max_batch, bool overlap);

// Where a call's work must start: after what `stream` has queued so far, through `event` (recorded there again each
// time, only if the stream has work left; a wait keeps the record it saw). An event of 0 means no wait (a stream
// handle of 0 is the legacy default stream).
struct StreamOrder {
  std::uintptr_t stream;
  std::uintptr_t event;
};

// The DMA path's per-transfer work in one host pass: `stream` first waits for `after`, then regions of a
// RegionTemplate (kvport/hal/transfer/regions.py, int64 arrays) filled with this chunk's block ids and address,
// touching runs joined, go to memcpy_batch.
struct RegionTemplateArgs {
  const std::int64_t* eng_base;
  const std::int64_t* block_pos;
  const std::int64_t* block_stride;
  const std::int64_t* can_off;
  const std::int64_t* size;
  std::size_t count;
  const std::int64_t* flat_ids;
  std::size_t n_ids;
  std::uintptr_t chunk_ptr;
  bool to_host;
  std::uintptr_t stream;
  std::size_t max_batch;
  bool overlap;
  StreamOrder after;
};
const char* memcpy_template(const RegionTemplateArgs& args);

// One single-piece staged chunk issued in one call (kvport/kernels/cuda/staged_chunk.cu): kernels on
// kernel_stream, the host copy on copy_stream, so consecutive chunks on alternating staging slots overlap one's copy
// with the next one's kernels. `launches` is a host int64 array of n_launches rows (table address, stream count,
// width, max tiles) of one compiled plan; `ids` (n_ids block ids) are written into ids_host, pinned with room for
// them, which must stay allocated until kernel_stream reached this work; ids_dev is kernel_stream's device buffer.
// gather: engine -> staging -> host; scatter: host -> staging -> engine. The slot is written only after
// `freed_event` (recorded by the slot's previous chunk once done reading it; recorded once beforehand for a new
// slot), `filled_event` hands the slot from writer to reader, and both are recorded again here. The kernels first
// wait for `after` (the engine's stream: the forward that wrote the KV), only if it has work left, through its
// event (recorded there again each time; a wait keeps the record it saw). An `after` event of 0 skips that wait
// (a stream handle of 0 is the legacy default stream).
inline constexpr std::size_t kStagedLaunchColumns = 4;
struct StagedChunkArgs {
  const std::int64_t* launches;
  std::size_t n_launches;
  const std::int64_t* ids;
  std::size_t n_ids;
  std::uintptr_t ids_host;
  std::uintptr_t ids_dev;
  std::uintptr_t staging;
  std::uintptr_t host;
  std::size_t nbytes;
  bool gather;
  std::uintptr_t kernel_stream;
  std::uintptr_t copy_stream;
  std::uintptr_t filled_event;
  std::uintptr_t freed_event;
  StreamOrder after;
};
const char* staged_chunk(const StagedChunkArgs& args);

// Whether memcpy_batch(batched=true) uses a single batched runtime call in this build.
bool has_batched_memcpy();

// `s` waits for what `after.stream` has queued so far, if anything (stream_order.cu; shared by the one-call paths).
const char* wait_for_stream(std::uintptr_t s, const StreamOrder& after);

}  // namespace kvport
