# ruff: noqa: E731, B023  (kept as run; the lambdas run inside their loop iteration)
"""Device: what a one-chunk DMA transfer pays for the engine-order round trip (the engine's stream -> kvport's DMA
stream -> back), by event kind. Whole-block MLA chunk (32 layers, 256 tokens, 16 regions of 576 KiB, shuffled
blocks), back-to-back windows on one created stream, medians of 3; ratio = plain copy of the same bytes / case.
usage: PYTHONPATH=. python3 docs/bench/tools/event_hops.py  (raw: docs/bench/event-hops-h200-q.json)"""

import json
import random
import statistics
import sys

import torch

from kvport.bench._kernel_cases import sized_layout
from kvport.bench.kernels import BENCH_DIMS
from kvport.hal.backends.native import CudaBackend
from kvport.hal.platforms.cuda import CudaPlatform
from kvport.hal.transfer.executor import Transfer
from kvport.hal.transfer.regions import regions
from kvport.layouts import allocate
from kvport.layouts.whole_blocks import whole_blocks

dev = torch.device("cuda", 0)
native = CudaBackend()
torch.cuda.set_stream(torch.cuda.Stream(dev))  # cudaMemcpyBatchAsync refuses the legacy default stream


def window(fn, reps=200):
    fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(reps):
        fn()
    e.record()
    e.synchronize()
    return s.elapsed_time(e) / reps


med = lambda fn: statistics.median(window(fn) for _ in range(3))
spec = sized_layout("vllm-std-mla-block-outer", dict(BENCH_DIMS))
tokens = 256
need = -(-tokens // spec.groups[0].tokens_per_block)
kv = allocate(spec, 2 * need + 2, device=dev, fill="zeros")
kv.storages[0].random_(0, 256)
desc = whole_blocks(kv.descriptor)
ids = random.Random(0).sample(range(2 * need + 2), need)
nbytes = desc.canonical_bytes(tokens)
host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
devbuf = torch.empty(nbytes, dtype=torch.uint8, device=dev)
eng, can, size = regions(desc, ids, tokens, host.data_ptr())
side = torch.cuda.Stream(dev)
out = {"device": torch.cuda.get_device_name(dev), "bytes": nbytes, "regions": int(size.numel())}
plain_new_event = CudaPlatform.new_event

for d in ("d2h", "h2d"):
    src, dst = (devbuf, host) if d == "d2h" else (host, devbuf)
    dr, sr = (can, eng) if d == "d2h" else (eng, can)
    batch = lambda: native.memcpy_regions(dr, sr, size)

    def hopped(work, kw):
        def fn():
            there = torch.cuda.Event(**kw)
            there.record()
            side.wait_event(there)
            with torch.cuda.stream(side):
                work()
            back = torch.cuda.Event(**kw)
            back.record(side)
            torch.cuda.current_stream().wait_event(back)

        return fn

    r = {"plain copy": med(lambda: dst.copy_(src, non_blocking=True)), "batch, one stream": med(batch)}
    for name, kw in (("plain", {}), ("blocking-sync", {"blocking": True}), ("timing", {"enable_timing": True})):
        r[f"batch + round trip, {name} events"] = med(hopped(batch, kw))
    for name, make in (("plain", plain_new_event), ("blocking-sync", lambda self: torch.cuda.Event(blocking=True))):
        CudaPlatform.new_event = make
        tr = Transfer(native, dev, native=native)
        if d == "d2h":
            move = lambda: tr.to_host(desc, ids, host, tokens, path="dma").completion.wait_on()
        else:
            move = lambda: tr.from_host(host, desc, ids, tokens, path="dma").completion.wait_on()
        r[f"kvport dma transfer + wait_on, {name} events"] = med(move)
        if name == "plain":  # as the cache engine issues them: a callback each, so a host event each

            def move_and_callback():
                if d == "d2h":
                    result = tr.to_host(desc, ids, host, tokens, path="dma")
                else:
                    result = tr.from_host(host, desc, ids, tokens, path="dma")
                result.completion.wait_on()
                result.completion.add_done_callback(lambda error: None)

            r["kvport dma transfer + wait_on + a callback (host event)"] = med(move_and_callback)
    CudaPlatform.new_event = plain_new_event
    base = r["plain copy"]
    out[d] = {k: {"ms": round(v, 5), "ratio": round(base / v, 4)} for k, v in r.items()}
    for k, v in out[d].items():
        print(f"{d} {k:50} {v['ms'] * 1e3:8.1f} us  {v['ratio']:.3f}")
json.dump(out, sys.stdout if len(sys.argv) < 2 else open(sys.argv[1], "w"), indent=1)
