# ruff: noqa: E401, E702  (kept as run)
"""Device: cProfile of N one-chunk submit_store + wait_on (3 in flight), by tottime. usage: cache_cprof.py LAYOUT [N]"""

import cProfile
import pstats
import random
import sys
import time

import torch

from kvport.bench._kernel_cases import sized_layout
from kvport.bench.kernels import BENCH_DIMS
from kvport.cache import CacheEngine, load_config
from kvport.layouts import allocate

layout = sys.argv[1]
N = int(sys.argv[2]) if len(sys.argv) > 2 else 500
spec = sized_layout(layout, BENCH_DIMS)
need = [-(-256 // g.tokens_per_block) for g in spec.groups]
nb = [2 * n + 2 for n in need]
kv = allocate(spec, nb if len(nb) > 1 else nb[0], device="cuda", fill="zeros")
ids = [random.Random(0).sample(range(b), n) for b, n in zip(nb, need)]
ids = ids[0] if len(ids) == 1 else ids
e = CacheEngine(load_config(overrides={"chunk_tokens": 256, "l1_bytes": "4GiB"}, environ={}), "prof")
e.bind(kv.descriptor)


def stores(r, n):
    pend = []
    for i in range(n):
        t = e.submit_store([i + 100_000 * r, *range(255)], ids, 256)
        t.completion.wait_on()
        pend.append(t)
        if len(pend) >= 3:
            pend.pop(0).wait()
    for t in pend:
        t.wait()


stores(0, 100)
torch.cuda.synchronize()
t0 = time.perf_counter()
stores(1, N)
torch.cuda.synchronize()
print(f"== {layout}: {(time.perf_counter() - t0) / N * 1e6:.0f} us/op wall unprofiled")
p = cProfile.Profile()
p.enable()
stores(2, N)
torch.cuda.synchronize()
p.disable()
st = pstats.Stats(p)
st.sort_stats("tottime").print_stats(28)
