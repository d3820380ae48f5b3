# ruff: noqa: B023, E501  (kept as run; its lambdas are called at once, in the loop that defines them)
"""Device A/B: 256-token NHD chunk stores through the CacheEngine (3 in flight), DMA regions described on the
issuer thread vs on the calling thread; engine-thread ms per store call and GB/s, alternating rounds.
Runs only on branch dma-issuer (it switches Transfer._issuer / dma_issue_reason); kept as run for docs/performance.md (2026-11-30)."""

import statistics
import sys
import time

import torch
from _one_chunk import one_chunk_engine

layout = sys.argv[1] if len(sys.argv) > 1 else "vllm-flash-nhd"
N = 200
kv, ids, e = one_chunk_engine(layout, "ab")
t = e.mover.transfer
nbytes = kv.descriptor.canonical_bytes(256)
print("path", e.mover.path_for("d2h", 256), "bytes", nbytes)
h = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
dv = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
for _ in range(3):
    h.copy_(dv, non_blocking=True)
a.record()
for _ in range(50):
    h.copy_(dv, non_blocking=True)
b.record()
b.synchronize()
memcpy = nbytes * 50 / a.elapsed_time(b) / 1e6
print(f"memcpy d2h {memcpy:.1f} GB/s")
res = {}
key = [0]
for _rnd in range(3):
    for mode in ("issuer", "caller"):
        t._issuer, t.dma_issue_reason = (None, "") if mode == "issuer" else (None, "A/B: off")
        host, pend = [], []
        for warm in (True, False):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            host.clear()
            for _i in range(20 if warm else N):
                key[0] += 1
                s = time.perf_counter()
                tk = e.submit_store([key[0], *range(255)], ids, 256)
                tk.completion.wait_on()
                host.append(time.perf_counter() - s)
                pend.append(tk)
                if len(pend) >= 3:
                    pend.pop(0).wait()
            for p in pend:
                p.wait()
            pend.clear()
            torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / N
        res.setdefault(mode, []).append((statistics.median(host) * 1e3, nbytes / wall / 1e9 / memcpy))
for mode, v in res.items():
    print(
        f"{layout} {mode:6s}: engine-thread ms per store {[round(x[0], 3) for x in v]}  ratio to memcpy {[round(x[1], 3) for x in v]}"
    )
print("issuer reason:", repr(t.dma_issue_reason))
e.close()
