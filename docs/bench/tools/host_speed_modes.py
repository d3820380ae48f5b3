"""Device-only: is the copy engines' slow mode the host CPU's? For 8 s, windows of 40 back-to-back DMA calls of one
256-token Llama-3-8B NHD chunk (1024 regions, kvport's native call on one stream), each preceded by a fixed pure-CPU
loop: per window the loop's ms, host us per call, GB/s and the CPU the thread ran on. Prints the correlation and
percentiles; `python3 docs/bench/tools/host_speed_modes.py [out.json]`."""

import json
import random
import statistics
import sys
import time

import numpy as np
import torch

from kvport.hal.platform import detect_platform
from kvport.hal.registry import candidates
from kvport.hal.transfer.regions import region_template
from kvport.hal.transfer.segments import flat_block_id_list
from kvport.layouts import compile_descriptor, load_layout

LAYERS, HEADS, HEAD_DIM, BLOCK, TOKENS, BLOCKS = 32, 8, 128, 16, 256, 258
CALLS, SECONDS = 40, 8.0


def cpu_now() -> int:
    with open("/proc/thread-self/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[36])


dev = torch.device("cuda", 0)
stream = torch.cuda.Stream(dev)
torch.cuda.set_stream(stream)  # batched copies refuse the legacy default stream
kv = [
    torch.randint(-100, 100, (2, BLOCKS, BLOCK, HEADS, HEAD_DIM), dtype=torch.int16, device=dev).view(torch.bfloat16)
    for _ in range(LAYERS)
]
spec = load_layout("vllm-flash-nhd", layers=LAYERS, kv_heads=HEADS, head_dim=HEAD_DIM, block_size=BLOCK)
desc = compile_descriptor(spec, kv)
backend = {c.name: c.backend for c in candidates(detect_platform()) if c.verdict.ok}["cuda"]
ids = flat_block_id_list(desc, random.Random(0).sample(range(BLOCKS), TOKENS // BLOCK), TOKENS)
template = region_template(desc, TOKENS)
host = torch.empty(desc.canonical_bytes(TOKENS), dtype=torch.uint8, pin_memory=True)
rows = []
start = time.perf_counter()
while time.perf_counter() - start < SECONDS:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    sum(range(200_000))  # fixed CPU work: its time tells the vCPU's speed in this window
    loop_ms = (time.perf_counter() - t0) * 1e3
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    host_us, cpus = [], set()
    begin.record()
    for _ in range(CALLS):
        t0 = time.perf_counter()
        backend.memcpy_chunk(template, ids, host.data_ptr(), True, stream.cuda_stream)
        host_us.append((time.perf_counter() - t0) * 1e6)
        cpus.add(cpu_now())
    end.record()
    end.synchronize()
    ms = begin.elapsed_time(end) / CALLS
    rows.append(
        {
            "t": round(time.perf_counter() - start, 3),
            "cpu_loop_ms": round(loop_ms, 3),
            "host_us": round(statistics.median(host_us), 1),
            "gbps": round(host.numel() / ms / 1e6, 1),
            "cpus": sorted(cpus),
        }
    )
g = np.array([r["gbps"] for r in rows])
c = np.array([r["cpu_loop_ms"] for r in rows])
h = np.array([r["host_us"] for r in rows])
fast, slow = g >= 50, g < 45
corr = np.corrcoef(h, c)[0, 1]
print(f"windows {len(rows)}, slow (< 45 GB/s) {int(slow.sum())}, corr(host us, CPU loop ms) {corr:.2f}")
for name, sel in (("fast", fast), ("slow", slow)):
    if sel.any():
        print(
            f"{name}: CPU loop ms p10/50/90 {np.percentile(c[sel], [10, 50, 90]).round(2).tolist()}, "
            f"host us per call {np.percentile(h[sel], [10, 50, 90]).round(0).tolist()}"
        )
if len(sys.argv) > 1:
    with open(sys.argv[1], "w") as f:
        json.dump(rows, f)
