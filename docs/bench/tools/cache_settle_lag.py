"""Where a cached store's time goes (device): host issue time, and how late the ticket settles after the device
finished (watcher thread + callback + GIL). usage: prof_cache3.py LAYOUT [N]"""

import statistics
import sys
import time

import torch
from _one_chunk import one_chunk_engine

layout = sys.argv[1]
N = int(sys.argv[2]) if len(sys.argv) > 2 else 300
kv, ids, e = one_chunk_engine(layout, "prof")
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
