// The one segment-copy kernel behind gather.cu and scatter.cu: it walks the per-stream tables that
// kvport/hal/transfer/segments.py compiles from a CopyDescriptor. Must not know layouts or engines.
//
// Work split: one warp per tile (a run of super-slots of one stream, sized so a warp moves ~8 KiB). The vector type is chosen per launch from the alignment of every address and stride (16 bytes
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
  kPerTile,
  kTiles,
  kNumCols
};

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / KVPORT_WARP_SIZE;
// Vectors each lane loads before it stores: 4 x 16 B in flight per lane keeps HBM and PCIe busy.
constexpr int kUnroll = 4;

// Where one row instance (super-slot s, row r) lives, and how many of its vectors belong to the transfer.
struct RowRef {
  std::int64_t eng;  // Vec units, absolute
  std::int64_t can;  // Vec units from the chunk
  int valid;
};

__device__ __forceinline__ RowRef row_ref(const std::int64_t* __restrict__ row, const std::int64_t* __restrict__ blocks,
                                          std::int64_t s, int r) {
  const std::int64_t rows = row[kRows], row_len = row[kRowLen], spb = row[kSupersPerBlock];
  const std::int64_t block = blocks[row[kBlockOffset] + s / spb];
  const std::int64_t start = (s * rows + r) * row_len;
  const std::int64_t left = row[kLength] - start;
  RowRef ref;
  ref.eng = row[kEngBase] + block * row[kBlockStride] + (s % spb) * row[kSlotStride] + r * row[kRowStride];
  ref.can = row[kCanBase] + start;
  ref.valid = static_cast<int>(left < row_len ? (left > 0 ? left : 0) : row_len);
  return ref;
}

template <typename Vec>
__device__ __forceinline__ Vec* at(std::int64_t units) {
  return reinterpret_cast<Vec*>(static_cast<std::uintptr_t>(units) * sizeof(Vec));
}

// One warp per tile (a run of super-slots of one stream). Long rows: lanes stride along the row, 4 vectors in
// flight each. Short rows (<= 16 vectors, e.g. HND's 256-byte head rows): the warp splits into groups of
// `width` lanes, one row per group, 4 rows in flight, so no lane idles on a 16-vector row.
template <typename Vec, bool kGather>
__global__ void __launch_bounds__(kThreads) segment_copy_kernel(const std::int64_t* __restrict__ table,
                                                                 const std::int64_t* __restrict__ blocks,
                                                                 Vec* chunk, std::int64_t n_streams,
                                                                 std::int64_t max_tiles) {
  const int lane = threadIdx.x % KVPORT_WARP_SIZE;
  const std::int64_t warp = static_cast<std::int64_t>(blockIdx.x) * kWarps + threadIdx.x / KVPORT_WARP_SIZE;
  const std::int64_t warps = static_cast<std::int64_t>(gridDim.x) * kWarps;
  const std::int64_t items = n_streams * max_tiles;
  Vec* const base = chunk;
  for (std::int64_t item = warp; item < items; item += warps) {
    const std::int64_t* row = table + (item / max_tiles) * kNumCols;
    const std::int64_t t = item % max_tiles;
    if (t >= row[kTiles]) continue;
    const std::int64_t s0 = t * row[kPerTile];
    const std::int64_t s1 = min(s0 + row[kPerTile], row[kSupers]);
    const int rows = static_cast<int>(row[kRows]);
    const int row_len = static_cast<int>(row[kRowLen]);
    const int n_ri = static_cast<int>(s1 - s0) * rows;
    if (row_len > KVPORT_WARP_SIZE / 2) {
      for (int ri = 0; ri < n_ri; ++ri) {
        const RowRef ref = row_ref(row, blocks, s0 + ri / rows, ri % rows);
        Vec* e = at<Vec>(ref.eng);
        Vec* c = base + ref.can;
        Vec* dst = kGather ? c : e;
        const Vec* src = kGather ? e : c;
        int i = lane;
        for (; i + (kUnroll - 1) * KVPORT_WARP_SIZE < ref.valid; i += kUnroll * KVPORT_WARP_SIZE) {
          Vec v[kUnroll];
#pragma unroll
          for (int u = 0; u < kUnroll; ++u) v[u] = src[i + u * KVPORT_WARP_SIZE];
#pragma unroll
          for (int u = 0; u < kUnroll; ++u) dst[i + u * KVPORT_WARP_SIZE] = v[u];
        }
        for (; i < ref.valid; i += KVPORT_WARP_SIZE) dst[i] = src[i];
      }
    } else {
      int width = 1;  // lanes per row group: the smallest power of two >= row_len
      while (width < row_len) width <<= 1;
      const int groups = KVPORT_WARP_SIZE / width;
      const int g = lane / width, li = lane % width;
      // Walk row instances g, g+groups, ... keeping (super-slot, row, block index, in-block slot) incrementally:
      // one division per tile instead of two per 16-byte vector.
      const std::int64_t rows64 = rows, row_len64 = row_len, spb = row[kSupersPerBlock];
      const std::int64_t length = row[kLength], boff = row[kBlockOffset];
      const std::int64_t bstride = row[kBlockStride], sstride = row[kSlotStride], rstride = row[kRowStride];
      const std::int64_t eng_base = row[kEngBase], can_base = row[kCanBase];
      std::int64_t s = s0 + g / rows;
      int r = g % rows;
      std::int64_t b = s / spb, n = s % spb;
      for (int ri0 = g; ri0 < n_ri; ri0 += kUnroll * groups) {
        Vec v[kUnroll];
        Vec* dst[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          dst[u] = nullptr;
          if (ri0 + u * groups < n_ri) {
            const std::int64_t start = (s * rows64 + r) * row_len64;
            // A group is a power of two lanes wide: lanes past a shorter row would copy the bytes after it
            // (padding, or the next row) and race the lane that owns them.
            if (li < row_len && li < length - start) {
              Vec* e = at<Vec>(eng_base + blocks[boff + b] * bstride + n * sstride + r * rstride) + li;
              Vec* c = base + can_base + start + li;
              v[u] = kGather ? *e : *c;
              dst[u] = kGather ? c : e;
            }
          }
          r += groups;
          while (r >= rows) {
            r -= rows;
            ++s;
            if (++n == spb) {
              n = 0;
              ++b;
            }
          }
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
          if (dst[u] != nullptr) *dst[u] = v[u];
      }
    }
  }
}

template <typename Vec, bool kGather>
cudaError_t launch_typed(const SegmentArgs& a) {
  const std::int64_t items = a.n_streams * a.max_tiles;
  std::int64_t grid = (items + kWarps - 1) / kWarps;
  if (a.max_ctas > 0 && grid > a.max_ctas) grid = a.max_ctas;
  // 2^31-1 is the grid x limit; the warp loop strides over whatever a smaller grid leaves.
  if (grid > 0x7fffffff) grid = 0x7fffffff;
  if (grid == 0) return cudaSuccess;
  segment_copy_kernel<Vec, kGather><<<static_cast<unsigned>(grid), kThreads, 0,
                                      reinterpret_cast<cudaStream_t>(a.stream)>>>(
      reinterpret_cast<const std::int64_t*>(a.table), reinterpret_cast<const std::int64_t*>(a.blocks),
      reinterpret_cast<Vec*>(a.chunk), a.n_streams, a.max_tiles);
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
