"""Device: which step of submit_store takes the host time (wall per call of each, store pipeline depth 3), and the
bare transfer's own issue time with the same depth. usage: prof_cache4.py LAYOUT [N]"""

import collections
import functools
import statistics
import sys
import time

import torch
from _one_chunk import one_chunk_engine

from kvport.cache import mover as mv
from kvport.hal import completion as comp
from kvport.hal.transfer import executor as ex
from kvport.store import chunk_store as cs

acc = collections.defaultdict(list)


def timed(owner, name, label=None):
    f = getattr(owner, name, None)
    if f is None:  # a step this tree does not have (the tool also runs on older trees for A/B)
        return

    @functools.wraps(f)
    def w(*a, **k):
        t = time.perf_counter()
        try:
            return f(*a, **k)
        finally:
            acc[label or name].append(time.perf_counter() - t)

    setattr(owner, name, w)


for n in ("move", "_order_after", "_staged_one_call", "_dma", "plan", "_stage"):
    timed(ex.Transfer, n, "Transfer." + n)
try:
    from kvport.hal.transfer import one_call

    timed(one_call.OneCallChunks, "issue", "OneCallChunks.issue")
except ImportError:
    pass
for n in ("keys", "absent", "reserve", "admit"):
    timed(cs.ChunkStore, n, "ChunkStore." + n) if hasattr(cs, "ChunkStore") else None
timed(comp.EventCompletion, "add_done_callback", "EventCompletion.add_done_callback")
timed(comp.EventCompletion, "_finish", "EventCompletion._finish (watcher: settle callbacks)")
timed(mv.ChunkMover, "to_host", "ChunkMover.to_host")

layout = sys.argv[1]
N = int(sys.argv[2]) if len(sys.argv) > 2 else 300
kv, ids, e = one_chunk_engine(layout, "prof")
print(type(e.chunks).__name__)


def stores(r):
    pend = []
    for i in range(N):
        a = time.perf_counter()
        t = e.submit_store([i + 100_000 * r, *range(255)], ids, 256)
        acc["submit_store"].append(time.perf_counter() - a)
        t.completion.wait_on()
        pend.append(t)
        if len(pend) >= 3:
            pend.pop(0).wait()
    for t in pend:
        t.wait()


def bare(r):
    tables = [e.chunk_tables(e.descriptor.normalize_block_ids(ids), 0)]
    bufs = [torch.empty(kv.descriptor.canonical_bytes(256), dtype=torch.uint8, pin_memory=True) for _ in range(4)]
    pend = []
    for i in range(N):
        a = time.perf_counter()
        res = e.mover.transfer.move("d2h", e.mover.descriptor, [(tables[0], bufs[i % 4])], 256, e.mover.path)
        acc["bare move"].append(time.perf_counter() - a)
        pend.append(res)
        if len(pend) >= 3:
            pend.pop(0).wait()
    for p in pend:
        p.wait()


for f in (bare, stores):
    f(0)
    torch.cuda.synchronize()
    acc.clear()
    t0 = time.perf_counter()
    f(1)
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / N
    print(f"== {layout} {f.__name__}: {wall * 1e6:.0f} us/op wall")
    for k, v in sorted(acc.items(), key=lambda kv: -sum(kv[1])):
        print(
            f"   {k:40s} calls {len(v):4d}  median {statistics.median(v) * 1e6:6.1f} us"
            f"  mean {statistics.mean(v) * 1e6:6.1f} us"
        )
e.close()
