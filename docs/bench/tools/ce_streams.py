"""Device-only: is the copy engines' slow mode per engine? 32 MiB chunks of 1024 x 32 KiB regions (shuffled GPU
blocks <-> contiguous pinned host) issued as batched calls on 1, 2 or 4 streams, windows round-robin, alone and
under a GEMM; GB/s per window."""

import json
import random
import statistics
import sys

import torch

from kvport.bench._kernel_cases import Bench
from kvport.bench.kernels import BENCH_DIMS, GEMM_N

bench = Bench(None, [], [], [], ["none"], None, 5, BENCH_DIMS, GEMM_N)
native = bench.native
CHUNK, REG = 32 << 20, 32 << 10
N = CHUNK // REG
pool = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
host = torch.empty(CHUNK, dtype=torch.uint8, pin_memory=True)
slots = random.Random(1).sample(range((1 << 30) // REG), N)
gpu_addr = torch.tensor([pool.data_ptr() + s * REG for s in slots], dtype=torch.int64)
host_addr = torch.arange(N, dtype=torch.int64) * REG + host.data_ptr()
sizes = torch.full((N,), REG, dtype=torch.int64)
streams = [torch.cuda.Stream() for _ in range(4)]
gemm_stream = torch.cuda.Stream()
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
b = torch.randn_like(a)
c = torch.empty_like(a)
staging = torch.empty(CHUNK, dtype=torch.uint8, device="cuda")


def parts(k, interleave):
    if interleave:
        return [(torch.arange(i, N, k)) for i in range(k)]
    step = N // k
    return [torch.arange(i * step, (i + 1) * step) for i in range(k)]


def make(direction, k, interleave=False, batch=1024):
    calls = []
    for i, idx in enumerate(parts(k, interleave)):
        d, s = (host_addr[idx], gpu_addr[idx]) if direction == "d2h" else (gpu_addr[idx], host_addr[idx])
        calls.append((streams[i], d.contiguous(), s.contiguous(), sizes[idx].contiguous()))

    def one():
        for st, d, s, z in calls:
            with torch.cuda.stream(st):
                native.memcpy_regions(d, s, z, max_batch=batch)

    return one


def memcpy(direction):
    def one():
        with torch.cuda.stream(streams[0]):
            if direction == "d2h":
                host.copy_(staging, non_blocking=True)
            else:
                staging.copy_(host, non_blocking=True)

    return one


def window(fn, reps, load):
    if load:
        with torch.cuda.stream(gemm_stream):
            for _ in range(30):
                torch.matmul(a, b, out=c)
        torch.cuda._sleep(1_000_000)
    cur = torch.cuda.current_stream()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record(cur)
    for st in streams:
        st.wait_stream(cur)
    for _ in range(reps):
        fn()
    for st in streams:
        cur.wait_stream(st)
    end.record(cur)
    end.synchronize()
    gemm_stream.synchronize()
    return CHUNK * reps / (start.elapsed_time(end) / 1e3) / 1e9


configs = {}
for d in ("d2h", "h2d"):
    configs[f"{d} memcpy"] = memcpy(d)
    configs[f"{d} 1 stream"] = make(d, 1)
    configs[f"{d} 2 streams"] = make(d, 2)
    configs[f"{d} 2 streams interleaved"] = make(d, 2, True)
    configs[f"{d} 4 streams"] = make(d, 4)
for fn in configs.values():
    fn()
torch.cuda.synchronize()
out = {}
for load in (False, True):
    res = {k: [] for k in configs}
    for _r in range(10 if not load else 4):
        for k, fn in configs.items():
            res[k].append(window(fn, 40, load))
    for k, v in res.items():
        print(
            f"{'load' if load else 'alone'} {k:28s} median {statistics.median(v):5.1f} min {min(v):5.1f} "
            f"max {max(v):5.1f} GB/s  {[round(x, 1) for x in v]}",
            flush=True,
        )
    out["load" if load else "alone"] = res
json.dump(out, open(sys.argv[1], "w"))
