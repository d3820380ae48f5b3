# ruff: noqa: E401, E702  (kept as run)
"""Device: cProfile of N one-chunk submit_store + wait_on (3 in flight), by tottime and by cumulative time, with
the callers of the event waits. usage: cache_cprofile.py LAYOUT [N]"""

import cProfile
import pstats
import sys
import time

import torch
from _one_chunk import one_chunk_engine

layout = sys.argv[1]
N = int(sys.argv[2]) if len(sys.argv) > 2 else 500
kv, ids, e = one_chunk_engine(layout, "prof")


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
st.sort_stats("cumulative").print_stats(45)
st.print_callers("synchronize|wait_event|record")
