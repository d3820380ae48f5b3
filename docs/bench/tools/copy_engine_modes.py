"""Device-only: (1) copy-engine speed of a device-to-device gather vs region size, alone and under a GEMM (could a
staged path that uses no SMs serve rows under 32 KiB?); (2) whether the copy engines' two speeds follow an idle GPU:
DMA windows of 256-token NHD chunks with and without a one-CTA spinner on another stream, nvidia-smi per window."""

import random
import subprocess
import time

import torch

from kvport.bench._kernel_cases import Bench
from kvport.bench.kernels import BENCH_DIMS, GEMM_N

bench = Bench(None, [], [], [], ["none"], None, 5, BENCH_DIMS, GEMM_N)
native = bench.native
side, gemm_stream, spin = torch.cuda.Stream(), torch.cuda.Stream(), torch.cuda.Stream()
TOTAL = 64 << 20
pool = torch.empty(4 * TOTAL, dtype=torch.uint8, device="cuda")
gathered = torch.empty(TOTAL, dtype=torch.uint8, device="cuda")
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
b, c = torch.randn_like(a), torch.empty_like(a)


def timed(fn, reps: int, load: bool) -> float:
    """ms per fn() back to back on the side stream (cudaMemcpyBatchAsync refuses the legacy default stream)."""
    if load:
        with torch.cuda.stream(gemm_stream):
            for _ in range(40):
                torch.matmul(a, b, out=c)
        torch.cuda._sleep(2_000_000)  # the GEMMs take the SMs first
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    side.wait_stream(torch.cuda.current_stream())
    start.record(side)
    with torch.cuda.stream(side):
        for _ in range(reps):
            fn()
    end.record(side)
    end.synchronize()
    gemm_stream.synchronize()
    return start.elapsed_time(end) / reps


def regions(size: int, count: int, dst_base: int, seed: int):
    slots = random.Random(seed).sample(range(4 * TOTAL // size), count)
    srcs = torch.tensor([pool.data_ptr() + s * size for s in slots], dtype=torch.int64)
    dsts = torch.arange(count, dtype=torch.int64) * size + dst_base
    return dsts, srcs, torch.full((count,), size, dtype=torch.int64)


for size in (576, 1024, 4096, 9216, 18432, 32768):
    n = (16 << 20) // size
    dsts, srcs, sizes = regions(size, n, gathered.data_ptr(), size)

    def gather(dsts=dsts, srcs=srcs, sizes=sizes):
        native.memcpy_regions(dsts, srcs, sizes, max_batch=1024)

    with torch.cuda.stream(side):
        gather()
    torch.cuda.synchronize()
    for load in (False, True):
        ms = timed(gather, 5, load)
        print(
            f"CE D2D gather, {n} regions of {size} B: {n * size / ms / 1e6:.1f} GB/s", "under GEMM" if load else "alone"
        )


def smi() -> str:
    query = "clocks.sm,clocks.mem,pcie.link.gen.current,pcie.link.width.current,power.draw,pstate"
    return subprocess.run(
        ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True, text=True
    ).stdout.strip()


CHUNK = 32 << 20  # one 256-token Llama-3-8B chunk: 1024 regions of 32 KiB
host = torch.empty(CHUNK, dtype=torch.uint8, pin_memory=True)
dsts, srcs, sizes = regions(32768, CHUNK // 32768, host.data_ptr(), 1)
for mode in ("idle", "spinner", "idle", "spinner", "idle"):
    speeds = []
    for _ in range(6):
        if mode == "spinner":
            with torch.cuda.stream(spin):
                torch.cuda._sleep(200_000_000)  # ~100 ms of one busy CTA
        ms = timed(lambda: native.memcpy_regions(dsts, srcs, sizes, max_batch=1024), 60, False)
        speeds.append(f"{CHUNK / ms / 1e6:.1f}")
        if mode == "spinner":
            torch.cuda.synchronize()
        time.sleep(0.3)
    print(f"DMA 32 MiB chunks D2H, {mode}: GB/s per window {speeds}; nvidia-smi {smi()}")
staging = torch.empty(CHUNK, dtype=torch.uint8, device="cuda")
print(f"memcpy 32 MiB D2H: {CHUNK / timed(lambda: host.copy_(staging, non_blocking=True), 20, False) / 1e6:.1f} GB/s")
