// copy_bytes: a byte copy between device-visible addresses, 16-byte vectors where both ends are aligned.
// The smallest real kernel of the native module; gather/scatter over descriptors grow from it.
#include "ops.h"
#include "vendor.h"

namespace {

constexpr int kThreads = 256;

__global__ void copy_bytes_kernel(unsigned char* __restrict__ dst, const unsigned char* __restrict__ src,
                                  std::size_t nbytes) {
  const std::size_t stride = static_cast<std::size_t>(gridDim.x) * blockDim.x;
  std::size_t i = static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool aligned = ((reinterpret_cast<std::uintptr_t>(dst) | reinterpret_cast<std::uintptr_t>(src)) & 15) == 0;
  std::size_t done = 0;
  if (aligned) {
    const std::size_t vectors = nbytes / 16;
    auto* d = reinterpret_cast<uint4*>(dst);
    const auto* s = reinterpret_cast<const uint4*>(src);
    for (std::size_t v = i; v < vectors; v += stride) d[v] = s[v];
    done = vectors * 16;
  }
  for (std::size_t b = done + i; b < nbytes; b += stride) dst[b] = src[b];
}

}  // namespace

namespace kvport {

const char* copy_bytes(std::uintptr_t dst, std::uintptr_t src, std::size_t nbytes, std::uintptr_t stream) {
  if (nbytes == 0) return nullptr;
  const std::size_t work = (nbytes + 15) / 16;
  const std::size_t wanted = (work + kThreads - 1) / kThreads;
  // 1024 blocks of 256 threads fill any current GPU; a grid-stride loop covers the rest.
  const unsigned blocks = static_cast<unsigned>(wanted < 1024 ? wanted : 1024);
  copy_bytes_kernel<<<blocks, kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
      reinterpret_cast<unsigned char*>(dst), reinterpret_cast<const unsigned char*>(src), nbytes);
  cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

const char* runtime_info(int* device_count, int* runtime_version, int* driver_version) {
  *device_count = 0;
  *runtime_version = 0;
  *driver_version = 0;
  cudaError_t err = cudaRuntimeGetVersion(runtime_version);
  if (err == cudaSuccess) err = cudaDriverGetVersion(driver_version);
  if (err == cudaSuccess) err = cudaGetDeviceCount(device_count);
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace kvport
