"""Device-only: kvport's DMA chunk call on Llama-3-8B-shaped per-layer NHD KV (shuffled blocks): host us per call
(256 and 16 tokens, calls interleaved, medians) and device ms per call back to back. Run once per tree to A/B:
`PYTHONPATH=<tree> python3 docs/bench/tools/dma_call_time.py <label>`; prints one JSON line."""

import json
import random
import statistics
import sys
import time

import torch

from kvport.hal.platform import detect_platform
from kvport.hal.registry import candidates
from kvport.hal.transfer.executor import Transfer
from kvport.hal.transfer.planner import CostModel
from kvport.layouts import compile_descriptor, load_layout

LAYERS, HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 16
ROUNDS, WINDOW = 200, 100

dev = torch.device("cuda", 0)
torch.cuda.set_stream(torch.cuda.Stream(dev))  # batched copies refuse the legacy default stream
blocks = 2 * 16 * 8 + 2
kv = [
    torch.randint(-100, 100, (2, blocks, BLOCK, HEADS, HEAD_DIM), dtype=torch.int16, device=dev).view(torch.bfloat16)
    for _ in range(LAYERS)
]
spec = load_layout("vllm-flash-nhd", layers=LAYERS, kv_heads=HEADS, head_dim=HEAD_DIM, block_size=BLOCK)
desc = compile_descriptor(spec, kv)
backend = {c.name: c.backend for c in candidates(detect_platform()) if c.verdict.ok}["cuda"]
transfer = Transfer(backend, dev, model=CostModel(), native=backend)
rng = random.Random(0)
cases = {}
for tokens in (256, 16):
    ids = rng.sample(range(blocks), tokens // BLOCK)
    host = torch.empty(desc.canonical_bytes(tokens), dtype=torch.uint8, pin_memory=True)
    cases[f"d2h {tokens}"] = lambda i=ids, h=host, t=tokens: transfer.to_host(desc, i, h, t, path="dma").wait()
    cases[f"h2d {tokens}"] = lambda i=ids, h=host, t=tokens: transfer.from_host(h, desc, i, t, path="dma").wait()
for fn in cases.values():
    for _ in range(5):
        fn()
torch.cuda.synchronize()
host_us = {k: [] for k in cases}
for r in range(ROUNDS):
    for k, fn in cases.items():
        t0 = time.perf_counter()
        fn()
        host_us[k].append((time.perf_counter() - t0) * 1e6)
    if r % 4 == 3:  # bounded queue: the device drains every few rounds
        torch.cuda.synchronize()
device_ms = {}
for k, fn in cases.items():
    if k.endswith(" 256"):
        for _ in range(3):
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(WINDOW):
                fn()
            end.record()
            end.synchronize()
            device_ms.setdefault(k, []).append(start.elapsed_time(end) / WINDOW)
out = {"tree": sys.argv[1] if len(sys.argv) > 1 else "this"}
out.update({f"host us {k}": round(statistics.median(v), 1) for k, v in host_us.items()})
out.update({f"device ms/call {k}": round(statistics.median(v), 4) for k, v in device_ms.items()})
print(json.dumps(out))
