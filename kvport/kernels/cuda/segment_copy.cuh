// The one segment-copy kernel behind gather.cu and scatter.cu: it walks the per-stream tables that
// kvport/hal/transfer/segments.py compiles from a CopyDescriptor. Must not know layouts or engines.
//
// Work split: one warp per (stream, super-slot); the warp's lanes stride over the super-slot's rows and
// vectors. The vector type is chosen per launch from the alignment of every address and stride (16 bytes
// where all allow, narrower otherwise), so one template serves every layout.
#pragma once

#include "ops.h"
#include "vendor.h"

namespace kvport {
namespace detail {

// Column order of one table row; must match kvport/hal/transfer/segments.py.
enum Col : int {
  kEngBase = 0,
  kBlockStride,
  kSlotStride,
  kRowStride,
  kRows,
  kRowLen,
  kCanBase,
  kSupers,
  kSupersPerBlock,
  kBlockOffset,
  kLength,
  kNumCols
};

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / KVPORT_WARP_SIZE;
// Vectors each lane loads before it stores: 4 x 16 B in flight per lane keeps HBM and PCIe busy.
constexpr int kUnroll = 4;

template <typename Vec, bool kGather>
__global__ void __launch_bounds__(kThreads) segment_copy_kernel(const std::int64_t* __restrict__ table,
                                                                 const std::int64_t* __restrict__ blocks,
                                                                 Vec* chunk, std::int64_t n_streams,
                                                                 std::int64_t max_supers) {
  const int lane = threadIdx.x % KVPORT_WARP_SIZE;
  const std::int64_t warp = static_cast<std::int64_t>(blockIdx.x) * kWarps + threadIdx.x / KVPORT_WARP_SIZE;
  const std::int64_t warps = static_cast<std::int64_t>(gridDim.x) * kWarps;
  const std::int64_t items = n_streams * max_supers;
  for (std::int64_t item = warp; item < items; item += warps) {
    const std::int64_t* row = table + (item / max_supers) * kNumCols;
    const std::int64_t s = item % max_supers;
    if (s >= row[kSupers]) continue;
    const std::int64_t spb = row[kSupersPerBlock];
    const std::int64_t block = blocks[row[kBlockOffset] + s / spb];
    const std::int64_t rows = row[kRows], row_len = row[kRowLen];
    // Engine addresses are absolute (the table's anchor is 0), in units of Vec.
    const std::int64_t eng_units = row[kEngBase] + block * row[kBlockStride] + (s % spb) * row[kSlotStride];
    Vec* eng = reinterpret_cast<Vec*>(static_cast<std::uintptr_t>(eng_units) * sizeof(Vec));
    Vec* can = chunk + row[kCanBase] + s * rows * row_len;
    const std::int64_t length = row[kLength];
    for (std::int64_t r = 0; r < rows; ++r) {
      const std::int64_t start = (s * rows + r) * row_len;
      const std::int64_t valid = start + row_len <= length ? row_len : (length > start ? length - start : 0);
      Vec* e = eng + r * row[kRowStride];
      Vec* c = can + r * row_len;
      Vec* dst = kGather ? c : e;
      const Vec* src = kGather ? e : c;
      std::int64_t i = lane;
      for (; i + (kUnroll - 1) * KVPORT_WARP_SIZE < valid; i += kUnroll * KVPORT_WARP_SIZE) {
        Vec v[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) v[u] = src[i + u * KVPORT_WARP_SIZE];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) dst[i + u * KVPORT_WARP_SIZE] = v[u];
      }
      for (; i < valid; i += KVPORT_WARP_SIZE) dst[i] = src[i];
    }
  }
}

template <typename Vec, bool kGather>
cudaError_t launch_typed(const SegmentArgs& a) {
  const std::int64_t items = a.n_streams * a.max_supers;
  std::int64_t grid = (items + kWarps - 1) / kWarps;
  if (a.max_ctas > 0 && grid > a.max_ctas) grid = a.max_ctas;
  // 2^31-1 is the grid x limit; the warp loop strides over whatever a smaller grid leaves.
  if (grid > 0x7fffffff) grid = 0x7fffffff;
  if (grid == 0) return cudaSuccess;
  segment_copy_kernel<Vec, kGather><<<static_cast<unsigned>(grid), kThreads, 0,
                                      reinterpret_cast<cudaStream_t>(a.stream)>>>(
      reinterpret_cast<const std::int64_t*>(a.table), reinterpret_cast<const std::int64_t*>(a.blocks),
      reinterpret_cast<Vec*>(a.chunk), a.n_streams, a.max_supers);
  return cudaGetLastError();
}

template <bool kGather>
const char* segment_copy(const SegmentArgs& a) {
  cudaError_t err;
  switch (a.width) {
    case 16: err = launch_typed<uint4, kGather>(a); break;
    case 8: err = launch_typed<uint2, kGather>(a); break;
    case 4: err = launch_typed<unsigned int, kGather>(a); break;
    case 2: err = launch_typed<unsigned short, kGather>(a); break;
    case 1: err = launch_typed<unsigned char, kGather>(a); break;
    default: return "segment copy: width must be 1, 2, 4, 8 or 16 bytes";
  }
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace detail
}  // namespace kvport
