"""Where a cached store's time goes (device): host issue time, and how late the ticket settles after the device
finished (watcher thread + callback + GIL). usage: prof_cache3.py LAYOUT [N]"""

import random
import statistics
import sys
import time

import torch

from kvport.bench._kernel_cases import sized_layout
from kvport.bench.kernels import BENCH_DIMS
from kvport.cache import CacheEngine, load_config
from kvport.layouts import allocate

layout = sys.argv[1]
N = int(sys.argv[2]) if len(sys.argv) > 2 else 300
spec = sized_layout(layout, BENCH_DIMS)
need = [-(-256 // g.tokens_per_block) for g in spec.groups]
nb = [2 * n + 2 for n in need]
kv = allocate(spec, nb if len(nb) > 1 else nb[0], device="cuda", fill="zeros")
ids = [random.Random(0).sample(range(b), n) for b, n in zip(nb, need)]
if len(ids) == 1:
    ids = ids[0]
cfg = load_config(overrides={"chunk_tokens": 256, "l1_bytes": "4GiB"}, environ={})
e = CacheEngine(cfg, "prof")
e.bind(kv.descriptor)
rnd = [0]


def run(depth, wait_kind):
    rnd[0] += 1
    pend, issue, lag = [], [], []
    t0 = time.perf_counter()
    for i in range(N):
        a = time.perf_counter()
        t = e.submit_store([i + 100_000 * rnd[0], *range(255)], ids, 256)
        t.completion.wait_on()
        issue.append(time.perf_counter() - a)
        pend.append(t)
        if len(pend) >= depth:
            old = pend.pop(0)
            if wait_kind == "event":
                old.completion.wait()
            else:
                old.completion.wait()
                b = time.perf_counter()
                old.wait()
                lag.append(time.perf_counter() - b)
    for t in pend:
        t.wait()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / N
    s = f"{layout} depth {depth} wait {wait_kind:6s}: {wall * 1e6:5.0f} us/op wall, "
    s += f"issue median {statistics.median(issue) * 1e6:4.0f} us"
    if lag:
        p90 = sorted(lag)[int(0.9 * len(lag))]
        s += f", settle after event median {statistics.median(lag) * 1e6:4.0f} us p90 {p90 * 1e6:4.0f}"
    print(s, flush=True)


for sw in (None, 1e-4):
    if sw:
        sys.setswitchinterval(sw)
        print("switchinterval", sw)
    for depth in (3, 8):
        for kind in ("ticket", "event"):
            run(depth, kind)
e.close()
