"""Device-only: copy-engine speed vs region size (the planner's DMA floor). Regions of S bytes at shuffled device
offsets, host side contiguous, batched calls of 1024 regions (one 256-token chunk's worth), alone, both ways."""

import random

import torch

from kvport.bench._kernel_cases import Bench
from kvport.bench.kernels import BENCH_DIMS, GEMM_N

bench = Bench(None, [], [], [], ["none"], None, 5, BENCH_DIMS, GEMM_N)
native = bench.native
total = 64 << 20
dev = torch.empty(4 * total, dtype=torch.uint8, device="cuda")
host = torch.empty(total, dtype=torch.uint8, pin_memory=True)
side = torch.cuda.Stream()  # cudaMemcpyBatchAsync refuses the legacy default stream
for kib in (4, 8, 12, 16, 18, 20, 24, 28, 32, 48, 64):
    size = kib << 10
    n = total // size
    slots = random.Random(kib).sample(range(4 * total // size), n)
    d = torch.tensor([dev.data_ptr() + s * size for s in slots], dtype=torch.int64)
    h = torch.arange(n, dtype=torch.int64) * size + host.data_ptr()
    sz = torch.full((n,), size, dtype=torch.int64)
    for direction in ("d2h", "h2d"):
        dsts, srcs = (h, d) if direction == "d2h" else (d, h)

        def fn(dsts=dsts, srcs=srcs, sz=sz):
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                native.memcpy_regions(dsts, srcs, sz, max_batch=1024)
            torch.cuda.current_stream().wait_stream(side)

        one = bench._time(fn, 2)
        ms = bench._time(fn, bench._reps(one))
        ratio = n * size / ms / 1e6 / bench.memcpy_gbps(direction, n * size)
        print(f"region {kib:3d} KiB {direction}: {ratio:.3f} of memcpy ({n} regions, {ms:.3f} ms)", flush=True)
