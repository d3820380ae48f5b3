# ruff: noqa: B023, E501  (kept as run; its lambdas are called at once, in the loop that defines them)
"""Device A/B: one 256-token staged chunk back to back, in parts (default) vs one part (events withheld), alternating
rounds; ms per op and ratio to a pinned memcpy of the same bytes.
Runs only on branch parts-overlap (it withholds Transfer._chunk_events); kept as run for docs/performance.md (2026-11-30).
Its window end is not ordered after the transfers: see the correction in docs/performance.md."""

import random
import sys

import torch

from kvport.bench.kernels import BENCH_DIMS
from kvport.hal.transfer.executor import Transfer
from kvport.layouts import allocate, load_layout
from kvport.testing.gpu import backend_or_skip

native = backend_or_skip("cuda")
for layout in sys.argv[1:]:
    spec = load_layout(layout)
    dims = {k: v for k, v in BENCH_DIMS.items() if k in dict(spec.dims)}
    if any(g.kind != "attention" for g in spec.groups if not g.opaque):
        dims = {k: v for k, v in dims.items() if k in ("layers", "dtype")}
    spec = load_layout(layout, **dims)
    need = [-(-256 // g.tokens_per_block) for g in spec.groups]
    nb = [2 * n + 2 for n in need]
    kv = allocate(spec, nb if len(nb) > 1 else nb[0], device="cuda", fill="zeros")
    ids = [random.Random(0).sample(range(b), n) for b, n in zip(nb, need)]
    d = kv.descriptor
    nbytes = d.canonical_bytes(256)
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    t = Transfer(native, "cuda", native=native)
    real = t._chunk_events

    def timed(fn, reps=60):
        fn()
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(reps):
            fn()
        b.record()
        b.synchronize()
        return a.elapsed_time(b) / reps

    res = {}
    for _rnd in range(3):
        for mode in ("parts", "one"):
            t._chunk_events = real if mode == "parts" else (lambda: None)
            for direction in ("d2h", "h2d"):
                if direction == "d2h":
                    ms = timed(lambda: t.to_host(d, ids, host, 256, path="staged"))
                    mc = timed(lambda: host.copy_(dev, non_blocking=True))
                else:
                    ms = timed(lambda: t.from_host(host, d, ids, 256, path="staged"))
                    mc = timed(lambda: dev.copy_(host, non_blocking=True))
                res.setdefault((mode, direction), []).append(mc / ms)
    for (mode, direction), v in sorted(res.items()):
        print(
            f"{layout:15s} {nbytes >> 20:3d} MiB {direction} {mode:5s}: ratio to memcpy {[round(x, 3) for x in v]}",
            flush=True,
        )
