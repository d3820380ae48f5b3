// HIP spellings of the CUDA runtime names kvport's kernels use, so kernels/cuda/*.cu compile unchanged
// with hipcc. Only names, the wavefront width and feature switches live here; never copies of kernels.
#pragma once

#include <hip/hip_runtime.h>

// AMD CDNA GPUs schedule 64-lane wavefronts; kernels size warp-level work from this.
#define KVPORT_WARP_SIZE 64

// hipMemcpyBatchAsync is unreliable before ROCm 7.14 (issue 4) and absent from Debian's HIP 5.2 headers:
// ROCm builds always take per-region copies.
#define KVPORT_BATCHED_MEMCPY 0

#define cudaError_t hipError_t
#define cudaSuccess hipSuccess
#define cudaStream_t hipStream_t
#define cudaGetErrorString hipGetErrorString
#define cudaGetLastError hipGetLastError
#define cudaGetDeviceCount hipGetDeviceCount
#define cudaRuntimeGetVersion hipRuntimeGetVersion
#define cudaDriverGetVersion hipDriverGetVersion
#define cudaMemcpyAsync hipMemcpyAsync
#define cudaMemcpyDefault hipMemcpyDefault
#define cudaErrorNotReady hipErrorNotReady
#define cudaEvent_t hipEvent_t
#define cudaEventRecord hipEventRecord
#define cudaStreamQuery hipStreamQuery
#define cudaStreamWaitEvent hipStreamWaitEvent
