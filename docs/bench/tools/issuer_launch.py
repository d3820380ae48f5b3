# ruff: noqa: B023, E501  (kept as run; its lambdas are called at once, in the loop that defines them)
"""Device: what a 256-token NHD chunk store costs the engine's thread when the engine keeps launching kernels (a
forward of 500 small launches, then one store, repeated): host ms of the launches and of the store call, per mode:
idle (no stores), caller (regions described on the engine thread), issuer (issuer thread, one batch call per
chunk), issuer-N (issuer thread, batch calls of N regions, so the driver lock is let go between calls).
Runs only on branch dma-issuer (it switches Transfer._issuer / dma_issue_reason); kept as run for docs/performance.md (2026-11-30)."""

import dataclasses
import statistics
import sys
import time

import torch
from _one_chunk import one_chunk_engine

layout = sys.argv[1] if len(sys.argv) > 1 else "vllm-flash-nhd"
ITERS, LAUNCHES = 60, 500
GAP_S = float(sys.argv[2]) / 1e3 if len(sys.argv) > 2 else 0.0  # pure-Python "scheduler" time after each store
kv, ids, e = one_chunk_engine(layout, "ab")
t = e.mover.transfer
base_model = t.model
x = torch.zeros(1024, device="cuda")
key = [0]
res = {}
for rnd in range(3):
    for mode in ("idle", "caller", "issuer", "issuer-128"):
        t._issuer, t.dma_issue_reason = (None, "A/B: off") if mode == "caller" else (None, "")
        if mode.startswith("issuer"):
            t._dma_issuer()
            n = int(mode.split("-")[1]) if "-" in mode else 0
            t._issuer.model = dataclasses.replace(base_model, dma_batch_regions=n)
        launch, store, pend, settle = [], [], [], []
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _i in range(ITERS):
            s = time.perf_counter()
            for _ in range(LAUNCHES):
                x.add_(1)
            launch.append(time.perf_counter() - s)
            if mode == "idle":
                g = time.perf_counter() + GAP_S
                while time.perf_counter() < g:
                    pass
            else:
                key[0] += 1
                s = time.perf_counter()
                tk = e.submit_store([key[0], *range(255)], ids, 256)
                tk.completion.wait_on()
                store.append(time.perf_counter() - s)
                tk.completion.add_done_callback(lambda err, s=s: settle.append(time.perf_counter() - s))
                pend.append(tk)
                g = time.perf_counter() + GAP_S
                while time.perf_counter() < g:
                    pass
                if len(pend) >= 3:
                    pend.pop(0).wait()
        for p in pend:
            p.wait()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / ITERS
        if rnd:
            r = res.setdefault(
                mode, {"launch ms": [], "launch p90": [], "store ms": [], "wall ms/iter": [], "settle ms": []}
            )
            r["launch ms"].append(statistics.median(launch) * 1e3)
            r["launch p90"].append(sorted(launch)[int(0.9 * len(launch))] * 1e3)
            r["store ms"].append(statistics.median(store) * 1e3 if store else 0.0)
            r["wall ms/iter"].append(wall * 1e3)
            r["settle ms"].append(statistics.median(settle) * 1e3 if settle else 0.0)
for mode, r in res.items():
    print(
        f"gap {GAP_S * 1e3:.0f} ms {mode:11s} " + "  ".join(f"{k} {[round(v, 3) for v in vs]}" for k, vs in r.items())
    )
e.close()
