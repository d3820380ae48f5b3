"""Device: does submitting one chunk's regions from K threads (own stream each, GIL released in the native call)
multiply the driver's submission rate? 20 chunks of 1024 x 32 KiB back to back, D2H and H2D, K = 1, 2, 4."""

import random
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from kvport.bench._kernel_cases import Bench
from kvport.bench.kernels import BENCH_DIMS, GEMM_N

native = Bench(None, [], [], [], ["none"], None, 5, BENCH_DIMS, GEMM_N).native
CHUNK, REG = 32 << 20, 32 << 10
N = CHUNK // REG
pool = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
host = torch.empty(CHUNK, dtype=torch.uint8, pin_memory=True)
slots = random.Random(1).sample(range((1 << 30) // REG), N)
gpu = torch.tensor([pool.data_ptr() + x * REG for x in slots], dtype=torch.int64)
hst = torch.arange(N, dtype=torch.int64) * REG + host.data_ptr()
sizes = torch.full((N,), REG, dtype=torch.int64)
streams = [torch.cuda.Stream() for _ in range(4)]
pool_x = ThreadPoolExecutor(4)
staging = torch.empty(CHUNK, dtype=torch.uint8, device="cuda")


def part(k, i, d2h):
    step = N // k
    sl = slice(i * step, (i + 1) * step)
    d, s = (hst[sl], gpu[sl]) if d2h else (gpu[sl], hst[sl])
    with torch.cuda.stream(streams[i]):
        native.memcpy_regions(d, s, sizes[sl], max_batch=1024)


def chunk(k, d2h):
    if k == 1:
        part(1, 0, True if d2h else False)
        return
    futs = [pool_x.submit(part, k, i, d2h) for i in range(1, k)]
    part(k, 0, d2h)
    for f in futs:
        f.result()


for d2h in (True, False):
    for k in (1, 2, 4, 1, 2, 4):
        torch.cuda.synchronize()
        cur = torch.cuda.current_stream()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(cur)
        for st in streams:
            st.wait_stream(cur)
        t = time.perf_counter()
        hosts = []
        for _ in range(20):
            h = time.perf_counter()
            chunk(k, d2h)
            hosts.append(time.perf_counter() - h)
        for st in streams:
            cur.wait_stream(st)
        b.record(cur)
        b.synchronize()
        ms = a.elapsed_time(b)
        print(
            f"{'d2h' if d2h else 'h2d'} K={k}: {20 * CHUNK / ms / 1e6:5.1f} GB/s, "
            f"host per chunk median {statistics.median(hosts) * 1e6:6.0f} us",
            flush=True,
        )
# memcpy reference
a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
a.record()
[host.copy_(staging, non_blocking=True) for _ in range(20)]
b.record()
b.synchronize()
print(f"memcpy d2h: {20 * CHUNK / a.elapsed_time(b) / 1e6:5.1f} GB/s")
