"""Device: does cudaMemcpyBatchAsync block the host? Host time of one 1024 x 32 KiB batch (D2H, pinned host) with
0..6 batches already queued on the stream, for batch sizes 1024 and 256, and for per-region cudaMemcpyAsync."""

import random
import statistics
import time

import torch

from kvport.bench._kernel_cases import Bench
from kvport.bench.kernels import BENCH_DIMS, GEMM_N

native = Bench(None, [], [], [], ["none"], None, 5, BENCH_DIMS, GEMM_N).native
CHUNK, REG = 32 << 20, 32 << 10
N = CHUNK // REG
pool = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
hosts = [torch.empty(CHUNK, dtype=torch.uint8, pin_memory=True) for _ in range(8)]
slots = random.Random(1).sample(range((1 << 30) // REG), N)
src = torch.tensor([pool.data_ptr() + s * REG for s in slots], dtype=torch.int64)
sizes = torch.full((N,), REG, dtype=torch.int64)
dsts = [torch.arange(N, dtype=torch.int64) * REG + h.data_ptr() for h in hosts]
s = torch.cuda.Stream()


def issue(i, **kw):
    with torch.cuda.stream(s):
        native.memcpy_regions(dsts[i % 8], src, sizes, **kw)


for kw in ({"max_batch": 1024}, {"max_batch": 256}, {"batched": False}):
    for ahead in (0, 1, 2, 3, 6):
        times = []
        for _rep in range(8):
            s.synchronize()
            for j in range(ahead):
                issue(j, **kw)
            t = time.perf_counter()
            issue(7, **kw)
            times.append(time.perf_counter() - t)
        s.synchronize()
        print(
            f"{kw} with {ahead} queued ahead: host {statistics.median(times) * 1e6:7.1f} us "
            f"(min {min(times) * 1e6:.1f})",
            flush=True,
        )
ev = torch.cuda.Event()
t = time.perf_counter()
[issue(j, max_batch=1024) for j in range(16)]
ev.record(s)
t1 = time.perf_counter()
ev.synchronize()
t2 = time.perf_counter()
print(f"16 batches back to back: host {(t1 - t) * 1e3:.2f} ms to issue, {(t2 - t) * 1e3:.2f} ms to finish")
