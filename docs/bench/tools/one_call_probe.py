"""Device: where a bare one-call move spends its host time (one 256-token chunk, N in flight), with the native
waits switched off in turn. Ran at 35ae4bc (raw docs/bench/one-call-probe-h200-m.txt); its `_busy` wait is gone
since 4868a68, so later trees run only the "both" and "no-after" variants. usage: LAYOUT"""

import collections
import statistics
import sys
import time

import torch
from _one_chunk import one_chunk_engine

acc = collections.defaultdict(list)


def wrap(obj, name, label):
    f = getattr(obj, name)

    def w(*a, **k):
        t = time.perf_counter()
        try:
            return f(*a, **k)
        finally:
            acc[label].append(time.perf_counter() - t)

    setattr(obj, name, w)


layout = sys.argv[1]
kv, ids, e = one_chunk_engine(layout, "probe")
tr = e.mover.transfer
oc = tr._one_call
wrap(tr.backend, "staged_chunk", "backend.staged_chunk")
wrap(oc.ring, "take", "ring.take")
wrap(oc.platform, "current_stream_handle", "current_stream_handle")
tables = [e.chunk_tables(e.descriptor.normalize_block_ids(ids), 0)]
bufs = [torch.empty(kv.descriptor.canonical_bytes(256), dtype=torch.uint8, pin_memory=True) for _ in range(4)]
orig_after, orig_busy = oc._after_event, getattr(oc, "_busy", None)  # no busy wait after 35ae4bc


def run(variant, depth, wait_on):
    oc._after_event = 0 if "no-after" in variant else orig_after
    if orig_busy is not None:
        oc._busy = (0, 0) if "no-busy" in variant else orig_busy
    for _round in range(2):  # the first round warms up
        acc.clear()
        pend = []
        t0 = time.perf_counter()
        for i in range(300):
            a = time.perf_counter()
            res = tr.move("d2h", e.mover.descriptor, [(tables[0], bufs[i % 4])], 256, e.mover.path)
            acc["move"].append(time.perf_counter() - a)
            if wait_on:
                res.completion.wait_on()
            pend.append(res)
            if len(pend) >= depth:
                b = time.perf_counter()
                pend.pop(0).synchronize()
                acc["wait oldest"].append(time.perf_counter() - b)
        for p in pend:
            p.synchronize()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / 300
    line = "  ".join(f"{k} {statistics.median(v) * 1e6:.1f}" for k, v in acc.items())
    print(f"{layout} {variant:18s} depth {depth} wait_on {int(wait_on)}: wall {wall * 1e6:.0f} us/op | {line}")


for variant in ("both", "no-after") + (("no-busy", "no-after,no-busy") if orig_busy is not None else ()):
    for depth, wait_on in ((3, False), (3, True), (1, False)):
        run(variant, depth, wait_on)
