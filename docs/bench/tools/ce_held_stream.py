"""Device: is the batched call's host time driver work per region or pacing behind the copy engine? Host time of one
32 MiB batch with the stream idle, and with the stream held by a 50 ms sleep kernel (the engine cannot start), for
32/64/128 KiB regions; and the copy's device time."""

import random
import statistics
import time

import torch

from kvport.bench._kernel_cases import Bench
from kvport.bench.kernels import BENCH_DIMS, GEMM_N

native = Bench(None, [], [], [], ["none"], None, 5, BENCH_DIMS, GEMM_N).native
CHUNK = 32 << 20
pool = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
host = torch.empty(CHUNK, dtype=torch.uint8, pin_memory=True)
s = torch.cuda.Stream()
for REG in (32 << 10, 64 << 10, 128 << 10):
    N = CHUNK // REG
    slots = random.Random(1).sample(range((1 << 30) // REG), N)
    src = torch.tensor([pool.data_ptr() + x * REG for x in slots], dtype=torch.int64)
    sizes = torch.full((N,), REG, dtype=torch.int64)
    dst = torch.arange(N, dtype=torch.int64) * REG + host.data_ptr()
    for held in (False, True):
        hosts, devs = [], []
        for _rep in range(6):
            s.synchronize()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with torch.cuda.stream(s):
                if held:
                    torch.cuda._sleep(100_000_000)
                a.record(s)
                t = time.perf_counter()
                native.memcpy_regions(dst, src, sizes, max_batch=1024)
                hosts.append(time.perf_counter() - t)
                b.record(s)
            b.synchronize()
            devs.append(a.elapsed_time(b) * 1e3)
        print(
            f"{N:5d} x {REG >> 10:3d} KiB, stream {'held by a kernel' if held else 'idle':16s}: "
            f"host {statistics.median(hosts) * 1e6:6.1f} us/call, device {statistics.median(devs):6.1f} us "
            f"({CHUNK / statistics.median(devs) / 1e3:.1f} GB/s)",
            flush=True,
        )
