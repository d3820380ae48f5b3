// Device probe: host cost and speed of copy-engine batches for one chunk, 1D regions (cudaMemcpyBatchAsync) vs
// 2D/3D copies (cudaMemcpy3DBatchAsync) over evenly spaced layers, alone or with GEMMs queued on another stream.
// Raw output: docs/bench/ce-pitched-probe-h200-n.txt. Build and run on the GPU machine:
//   nvcc -O2 -std=c++17 -o /tmp/probe ce_pitched_probe.cu -lcublas && /tmp/probe REPS STREAMS LOAD
// mode 0 memcpy, 1 one 1D region per (layer, K/V, block), 3 one 3D copy per block over K/V and layers; mode 2 (one
// 2D copy per layer and block over K/V) ran in the first call and is skipped now (`if (mode == 2) continue;`).
#include <cuda_runtime.h>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <algorithm>
#include <random>
#include <cstring>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("ERR %s line %d: %s\n", #x, __LINE__, cudaGetErrorString(e)); exit(1);} } while (0)
using clk = std::chrono::steady_clock;
static double us_since(clk::time_point t) { return std::chrono::duration<double, std::micro>(clk::now() - t).count(); }

struct Shape { const char* name; int layers, planes; size_t blk; int nb, nblk; };

int main(int argc, char** argv) {
  int reps = argc > 1 ? atoi(argv[1]) : 100;
  int nstreams = argc > 2 ? atoi(argv[2]) : 1;
  int load = argc > 3 ? atoi(argv[3]) : 0;
  cublasHandle_t hb; cudaStream_t ls; CK(cudaStreamCreateWithFlags(&ls, cudaStreamNonBlocking));
  __nv_bfloat16 *A = nullptr, *B = nullptr, *C = nullptr; const int N = 8192;
  if (load) { cublasCreate(&hb); cublasSetStream(hb, ls); CK(cudaMalloc(&A, (size_t)N*N*2)); CK(cudaMalloc(&B, (size_t)N*N*2)); CK(cudaMalloc(&C, (size_t)N*N*2)); }
  auto gemms = [&](int n) { float a = 1, b = 0; for (int i = 0; i < n; ++i) cublasGemmEx(hb, CUBLAS_OP_N, CUBLAS_OP_N, N, N, N, &a, A, CUDA_R_16BF, N, B, CUDA_R_16BF, N, &b, C, CUDA_R_16BF, N, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT); };
  std::vector<cudaStream_t> ss(nstreams); for (auto& x : ss) CK(cudaStreamCreateWithFlags(&x, cudaStreamNonBlocking));
  cudaEvent_t j; CK(cudaEventCreateWithFlags(&j, cudaEventDisableTiming));
  Shape shapes[] = {{"nhd-256 (32 KiB rows, K/V)", 32, 2, 32768, 1024, 16},
                    {"mla-256 (18 KiB rows)", 32, 1, 18432, 1024, 16},
                    {"nhd-8k (32 KiB rows, K/V)", 32, 2, 32768, 1024, 512},
                    {"mla-8k (18 KiB rows)", 32, 1, 18432, 1024, 512},
                    {"dsv4-like 256 (584 B x16 rows = 9 KiB)", 61, 1, 9344, 1024, 16}};
  cudaStream_t s; CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  cudaEvent_t e0, e1; CK(cudaEventCreate(&e0)); CK(cudaEventCreate(&e1));
  for (auto& sh : shapes) {
    size_t plane = (size_t)sh.nb * sh.blk, layer = plane * sh.planes, total = layer * sh.layers;
    size_t chunk = (size_t)sh.nblk * sh.blk * sh.planes * sh.layers;
    char* dev; CK(cudaMalloc(&dev, total));
    char* host; CK(cudaMallocHost(&host, chunk));
    char* host2; CK(cudaMallocHost(&host2, chunk));
    CK(cudaMemset(dev, 7, total));
    std::vector<int> ids(sh.nb); for (int i = 0; i < sh.nb; ++i) ids[i] = i;
    std::mt19937 rng(1); std::shuffle(ids.begin(), ids.end(), rng); ids.resize(sh.nblk);
    // host order: [layer][plane][block][bytes]
    size_t hplane = (size_t)sh.nblk * sh.blk, hlayer = hplane * sh.planes;
    for (int dir = 0; dir < 2; ++dir) {  // 0 d2h, 1 h2d
      // memcpy reference
      auto ref = [&]() { return dir ? cudaMemcpyAsync(dev, host, chunk, cudaMemcpyHostToDevice, s) : cudaMemcpyAsync(host, dev, chunk, cudaMemcpyDeviceToHost, s); };
      for (int mode = 0; mode < 4; ++mode) {
        // mode 0: memcpy; 1: 1D batch, one op per (layer, plane, block); 2: 3D op per (layer, block) over planes; 3: 3D op per block over planes and layers
        if (mode == 2) continue;
        std::vector<void*> dsts, srcs; std::vector<size_t> sizes; std::vector<cudaMemcpy3DBatchOp> ops;
        auto op3 = [&](char* d, char* h, size_t w, size_t hgt, size_t dep, size_t dpitch_row, size_t dlayerh, size_t hpitch_row, size_t hlayerh) {
          cudaMemcpy3DBatchOp o = {};
          cudaMemcpy3DOperand D = {}, H = {};
          D.type = cudaMemcpyOperandTypePointer; D.op.ptr.ptr = d; D.op.ptr.rowLength = dpitch_row; D.op.ptr.layerHeight = dlayerh;
          H.type = cudaMemcpyOperandTypePointer; H.op.ptr.ptr = h; H.op.ptr.rowLength = hpitch_row; H.op.ptr.layerHeight = hlayerh;
          o.src = dir ? H : D; o.dst = dir ? D : H; o.extent = make_cudaExtent(w, hgt, dep);
          o.srcAccessOrder = cudaMemcpySrcAccessOrderStream; o.flags = 0; ops.push_back(o);
        };
        if (mode == 1) {
          for (int l = 0; l < sh.layers; ++l) for (int p = 0; p < sh.planes; ++p) for (int b = 0; b < sh.nblk; ++b) {
            char* d = dev + l * layer + p * plane + (size_t)ids[b] * sh.blk; char* h = host + l * hlayer + p * hplane + (size_t)b * sh.blk;
            dsts.push_back(dir ? (void*)d : (void*)h); srcs.push_back(dir ? (void*)h : (void*)d); sizes.push_back(sh.blk);
          }
        } else if (mode == 2) {
          for (int l = 0; l < sh.layers; ++l) for (int b = 0; b < sh.nblk; ++b)
            op3(dev + l * layer + (size_t)ids[b] * sh.blk, host + l * hlayer + (size_t)b * sh.blk, sh.blk, sh.planes, 1, plane, sh.planes, hplane, sh.planes);
        } else if (mode == 3) {
          // rows = (layer, plane) pairs flattened when planes==1: height=layers with row pitch = layer stride
          for (int b = 0; b < sh.nblk; ++b) {
            if (sh.planes == 1) op3(dev + (size_t)ids[b] * sh.blk, host + (size_t)b * sh.blk, sh.blk, sh.layers, 1, layer, sh.layers, hlayer, sh.layers);
            else op3(dev + (size_t)ids[b] * sh.blk, host + (size_t)b * sh.blk, sh.blk, sh.planes, sh.layers, plane, sh.planes, hplane, sh.planes);
          }
        }
        cudaMemcpyAttributes attr = {}; attr.srcAccessOrder = cudaMemcpySrcAccessOrderStream; size_t ai = 0;
        auto issue = [&]() -> cudaError_t {
          if (mode == 0) return ref();
          CK(cudaEventRecord(j, s));
          static std::vector<cudaEvent_t> ends; while ((int)ends.size() < nstreams) { cudaEvent_t x; CK(cudaEventCreateWithFlags(&x, cudaEventDisableTiming)); ends.push_back(x); }
          size_t n = mode == 1 ? sizes.size() : ops.size();
          for (int k = 0; k < nstreams; ++k) {
            size_t a0 = n * k / nstreams, a1 = n * (k + 1) / nstreams; if (a1 == a0) continue;
            CK(cudaStreamWaitEvent(ss[k], j, 0));
            if (mode == 1) CK(cudaMemcpyBatchAsync(dsts.data() + a0, srcs.data() + a0, sizes.data() + a0, a1 - a0, &attr, &ai, 1, ss[k]));
            else CK(cudaMemcpy3DBatchAsync(a1 - a0, ops.data() + a0, 0, ss[k]));
            CK(cudaEventRecord(ends[k], ss[k])); CK(cudaStreamWaitEvent(s, ends[k], 0));
          }
          return cudaSuccess;
        };
        // correctness (d2h): compare against 1D into host2 once
        CK(issue()); CK(cudaStreamSynchronize(s));
        std::vector<double> host_us; host_us.reserve(reps);
        for (int r = 0; r < 3; ++r) { CK(issue()); } CK(cudaStreamSynchronize(s));
        if (load) { gemms(60); }
        CK(cudaEventRecord(e0, s));
        auto t0 = clk::now();
        for (int r = 0; r < reps; ++r) { auto t = clk::now(); CK(issue()); host_us.push_back(us_since(t)); }
        double issue_total = us_since(t0);
        CK(cudaEventRecord(e1, s)); CK(cudaEventSynchronize(e1));
        float ms; CK(cudaEventElapsedTime(&ms, e0, e1));
        double wall = us_since(t0);
        std::sort(host_us.begin(), host_us.end());
        size_t nops = mode == 0 ? 1 : mode == 1 ? sizes.size() : ops.size();
        printf("s%d L%d %-40s %s mode=%d ops=%5zu host/op-call median %8.1f us  issue %8.0f us  gpu %8.0f us  wall %8.0f us  GB/s %6.1f\n",
               nstreams, load, sh.name, dir ? "h2d" : "d2h", mode, nops, host_us[reps / 2], issue_total, ms * 1e3, wall, (double)chunk * reps / (wall * 1e3));
      }
      // correctness check of modes 2/3 for d2h against mode 1 done via content: device memset to pattern
    }
    // correctness: fill device with index pattern, d2h via 3D per-block op, compare with 1D
    {
      std::vector<unsigned char> pat(total); for (size_t i = 0; i < total; ++i) pat[i] = (unsigned char)((i * 2654435761u) >> 13);
      CK(cudaMemcpy(dev, pat.data(), total, cudaMemcpyHostToDevice));
      std::vector<void*> dsts, srcs; std::vector<size_t> sizes;
      for (int l = 0; l < sh.layers; ++l) for (int p = 0; p < sh.planes; ++p) for (int b = 0; b < sh.nblk; ++b) {
        dsts.push_back(host + l * hlayer + p * hplane + (size_t)b * sh.blk); srcs.push_back(dev + l * layer + p * plane + (size_t)ids[b] * sh.blk); sizes.push_back(sh.blk); }
      cudaMemcpyAttributes attr = {}; attr.srcAccessOrder = cudaMemcpySrcAccessOrderStream; size_t ai = 0;
      CK(cudaMemcpyBatchAsync(dsts.data(), srcs.data(), sizes.data(), sizes.size(), &attr, &ai, 1, s));
      std::vector<cudaMemcpy3DBatchOp> ops;
      for (int b = 0; b < sh.nblk; ++b) {
        cudaMemcpy3DBatchOp o = {}; o.src.type = o.dst.type = cudaMemcpyOperandTypePointer;
        o.src.op.ptr.ptr = dev + (size_t)ids[b] * sh.blk; o.dst.op.ptr.ptr = host2 + (size_t)b * sh.blk;
        if (sh.planes == 1) { o.src.op.ptr.rowLength = layer; o.src.op.ptr.layerHeight = sh.layers; o.dst.op.ptr.rowLength = hlayer; o.dst.op.ptr.layerHeight = sh.layers; o.extent = make_cudaExtent(sh.blk, sh.layers, 1); }
        else { o.src.op.ptr.rowLength = plane; o.src.op.ptr.layerHeight = sh.planes; o.dst.op.ptr.rowLength = hplane; o.dst.op.ptr.layerHeight = sh.planes; o.extent = make_cudaExtent(sh.blk, sh.planes, sh.layers); }
        o.srcAccessOrder = cudaMemcpySrcAccessOrderStream; ops.push_back(o);
      }
      CK(cudaMemcpy3DBatchAsync(ops.size(), ops.data(), 0, s)); CK(cudaStreamSynchronize(s));
      printf("%-40s 3D-vs-1D bytes equal: %s\n", sh.name, memcmp(host, host2, chunk) == 0 ? "yes" : "NO");
    }
    CK(cudaFree(dev)); CK(cudaFreeHost(host)); CK(cudaFreeHost(host2));
  }
  return 0;
}
