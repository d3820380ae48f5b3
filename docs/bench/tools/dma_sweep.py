"""Issue 10 investigation (device only, not shipped): what separates kvport's batched memcpy from LMCache's.
Sweeps batch size, flags and per-chunk calls on the DMA path, alone and under GEMM load; prints one row per case."""

import dataclasses
import json
import os
import random
import sys

import torch

from kvport.bench._kernel_cases import Bench, sized_layout
from kvport.bench.kernels import BENCH_DIMS, GEMM_N
from kvport.hal.transfer.executor import Transfer
from kvport.hal.transfer.planner import CostModel
from kvport.layouts import allocate

out = []
bench = Bench(None, [], [], [], ["none", "gemm"], None, 5, BENCH_DIMS, GEMM_N)
native = bench.native
backend = bench.backends["cuda"]
layouts = sys.argv[1].split(",") if len(sys.argv) > 1 else ["vllm-flash-nhd", "vllm-mla"]
for name in layouts:
    spec = sized_layout(name, BENCH_DIMS)
    for tokens in (8192, 256):
        need = [-(-tokens // g.tokens_per_block) for g in spec.groups]
        nb = [2 * n + 2 for n in need]
        kv = allocate(spec, nb if len(nb) > 1 else nb[0], device="cuda", fill="zeros")
        for s in kv.storages:
            s.random_(0, 256)
        rng = random.Random(0)
        ids = [rng.sample(range(b), n) for b, n in zip(nb, need)]
        d = kv.descriptor
        chunk = 256
        chunks = tokens // chunk
        tables = [
            [
                t[i * (chunk // g.tokens_per_block) : (i + 1) * (chunk // g.tokens_per_block)]
                for g, t in zip(d.groups, ids)
            ]
            for i in range(chunks)
        ]
        nbytes = d.canonical_bytes(tokens)
        one_host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        hosts = [torch.empty(d.canonical_bytes(chunk), dtype=torch.uint8, pin_memory=True) for _ in range(chunks)]
        for direction in ("d2h", "h2d"):
            limit = bench.memcpy_gbps(direction, nbytes)
            configs = [
                ("one-call", 0, False, False),
                ("batch1024", 1024, False, False),
                ("per-chunk", 0, False, True),
                ("per-chunk+overlap", 0, True, True),
            ]
            if tokens == chunk:
                configs = [c for c in configs if not c[3]]
            for label, batch, overlap, per_chunk in configs:
                model = dataclasses.replace(CostModel(), dma_batch_regions=batch, dma_overlap=overlap)
                t = Transfer(backend, "cuda", model=model, native=native)
                if per_chunk:
                    items, count = list(zip(tables, hosts)), chunk
                else:
                    items, count = [(ids, one_host)], tokens

                def fn(t=t, items=items, count=count, direction=direction, d=d):
                    t.move(direction, d, items, count, "dma").wait()

                for load in ("none", "gemm"):
                    if load == "gemm":
                        ms, g = bench._under_load(fn)
                    else:
                        one = bench._time(fn, 2)
                        ms, g = bench._time(fn, bench._reps(one)), None
                    ratio = nbytes / ms / 1e6 / limit
                    row = dict(
                        layout=name, tokens=tokens, direction=direction, config=label, load=load, ratio=ratio, gemm=g
                    )
                    out.append(row)
                    print(f"{name:16} {tokens:5} {direction} {label:20} {load:5} ratio {ratio:.3f} gemm {g}")
        del kv
        torch.cuda.empty_cache()
json.dump(out, open(os.path.join(os.environ.get("OUT", "."), "dma_sweep.json"), "w"), indent=1)
