"""Device-only: is the copy-engine path's speed a property of the host buffer? Same NHD 8K D2H/H2D DMA transfer into
several pinned buffers (fresh, reused, CPU-touched first, 2 MiB-aligned), timed in rounds."""

import random

import torch

from kvport.bench._kernel_cases import Bench
from kvport.bench.kernels import BENCH_DIMS, GEMM_N
from kvport.hal.transfer.executor import Transfer

tokens = 8192
b = Bench(["vllm-flash-nhd"], [tokens], ["d2h"], ["dma"], ["none"], ["cuda"], 5, BENCH_DIMS, GEMM_N)
((_, spec, allocate),) = list(b._layouts())
need = -(-tokens // 16)
kv = allocate(spec, 2 * need + 2, device=b.device, fill="zeros")
ids = random.Random(0).sample(range(2 * need + 2), need)
d = kv.descriptor
nbytes = d.canonical_bytes(tokens)
t = Transfer(b.backends["cuda"], b.device, native=b.native)


def memcpy_ratio(host, direction, reps=5):
    dev = torch.empty(nbytes, dtype=torch.uint8, device=b.device)
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(reps):
        (host.copy_(dev, non_blocking=True) if direction == "d2h" else dev.copy_(host, non_blocking=True))
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / reps


def dma(host, direction, reps=5):
    for _ in range(2):
        (
            t.to_host(d, ids, host, tokens, path="dma")
            if direction == "d2h"
            else t.from_host(host, d, ids, tokens, path="dma")
        ).wait()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(reps):
        r = (
            t.to_host(d, ids, host, tokens, path="dma")
            if direction == "d2h"
            else t.from_host(host, d, ids, tokens, path="dma")
        )
        r.wait()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / reps


bufs = {}


def buf(name, touch=False):
    if name not in bufs:
        h = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        if touch:
            h.fill_(1)
        bufs[name] = h
    return bufs[name]


for rnd in range(3):
    for name, touch in [("A", False), ("B", True), (f"fresh{rnd}", False)]:
        h = buf(name, touch)
        for direction in ("d2h", "h2d"):
            m = memcpy_ratio(h, direction)
            x = dma(h, direction)
            print(
                f"round {rnd} buf {name:7s} {direction}: dma {x:.3f} ms, memcpy {m:.3f} ms, ratio {m / x:.3f}  "
                f"addr%2M={h.data_ptr() % (2 << 20)}",
                flush=True,
            )
