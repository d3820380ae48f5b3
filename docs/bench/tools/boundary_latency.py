"""Device: how long one chunk store / load takes when ordered after the engine's own stream, as the vLLM worker
orders it, against a plain pinned memcpy of the same bytes issued the same way; alone and with the engine's stream
running 8192^3 GEMMs before and after it (the next "forward" waits for the store's release / the load, as in vLLM).

`kvport bench kernels --load gemm` runs its GEMMs on a stream of their own, so a transfer's kernels wait for SMs at
some random point of a 1.6 ms GEMM. Here the transfer becomes ready at a kernel boundary of the engine's stream (the
end of the forward that wrote the KV), where a high-priority stream gets the SMs first. From that boundary (an event
recorded on the engine stream), medians of N: ms to the transfer's last byte (ratio memcpy / kvport) and ms until the
next forward may start. kvport's load copies into its own staging before the boundary (only its scatter waits), so
its last byte can come sooner after the boundary than a plain copy's, which writes engine memory.
usage: boundary_latency.py [N] [LAYOUT ...]; KVPORT_TOOL_PATH=staged|dma|... forces a path (default auto)."""

import os
import random
import statistics
import sys

import torch

from kvport.bench._kernel_cases import sized_layout
from kvport.bench.kernels import BENCH_DIMS
from kvport.hal.platform import detect_platform
from kvport.hal.registry import candidates
from kvport.hal.transfer.executor import Transfer
from kvport.layouts import allocate

PATH = os.environ.get("KVPORT_TOOL_PATH", "auto")
N = int(sys.argv[1]) if len(sys.argv) > 1 else 15
LAYOUTS = sys.argv[2:] or ["vllm-flash-nhd", "vllm-flash-hnd", "vllm-mla", "deepseek-v4"]
found = {c.name: c.backend for c in candidates(detect_platform()) if c.verdict.ok}
transfer = Transfer(found["cuda"], "cuda", native=found["cuda"])
engine = torch.cuda.current_stream()
side = torch.cuda.Stream()
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
b = torch.randn_like(a)


def gemm():
    return a @ b


def one(kind, direction, d, ids, tokens, host, dev_flat, load):
    """(ms from the boundary to the transfer's last byte, ms from the boundary to the next forward's start) of one
    transfer ordered after the engine stream, with GEMMs before and after it when ``load``."""
    ready, done, resume = (torch.cuda.Event(enable_timing=True) for _ in range(3))
    if load:
        gemm()
    ready.record(engine)
    if kind == "memcpy":
        # Engine memory on one side: after the forward that wrote it (store) or that may still read it (load), and
        # the next forward after its last byte (a plain copy uses engine memory to its end).
        side.wait_event(ready)
        with torch.cuda.stream(side):
            if direction == "d2h":
                host.copy_(dev_flat, non_blocking=True)
            else:
                dev_flat.copy_(host, non_blocking=True)
        done.record(side)
        engine.wait_stream(side)
    else:
        if direction == "d2h":
            res = transfer.to_host(d, ids, host, tokens, path=PATH)
        else:
            res = transfer.from_host(host, d, ids, tokens, path=PATH)
        res.completion.wait_on(engine)  # the vLLM worker's order: the next forward after the release / the load
        side.wait_event(ready)
        res.completion.wait_on_all(side)
        done.record(side)
    resume.record(engine)
    if load:
        gemm()  # the next forward
    torch.cuda.synchronize()
    return ready.elapsed_time(done), ready.elapsed_time(resume)


for name in LAYOUTS:
    spec = sized_layout(name, BENCH_DIMS)
    for tokens in [int(t) for t in os.environ.get("KVPORT_TOOL_TOKENS", "256,8192").split(",")]:
        need = [-(-tokens // g.tokens_per_block) for g in spec.groups]
        nb = [2 * n + 2 for n in need]
        kv = allocate(spec, nb if len(nb) > 1 else nb[0], device="cuda", fill="zeros")
        ids = [random.Random(0).sample(range(x), n) for x, n in zip(nb, need)]
        ids = ids[0] if len(ids) == 1 else ids
        d = kv.descriptor
        nbytes = d.canonical_bytes(tokens)
        host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        dev_flat = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        path = transfer.plan(d, tokens, "d2h", path=PATH).path
        for direction in ("d2h", "h2d"):
            for load in (False, True):
                got = {}
                for kind in ("memcpy", "kvport", "memcpy", "kvport"):  # interleaved; first round warms up
                    got[kind] = [one(kind, direction, d, ids, tokens, host, dev_flat, load) for _ in range(N)]
                mc, kp = ([statistics.median(x[i] for x in got[k]) for i in (0, 1)] for k in ("memcpy", "kvport"))
                print(
                    f"{name:16s} {tokens:5d} {direction} {path:7s} {'engine GEMMs' if load else 'alone':12s} "
                    f"last byte: memcpy {mc[0]:7.3f} kvport {kp[0]:7.3f} ms ({mc[0] / kp[0]:5.3f})  "
                    f"next forward waits: memcpy {mc[1]:7.3f} kvport {kp[1]:7.3f} ms",
                    flush=True,
                )
        del kv, host, dev_flat
        torch.cuda.empty_cache()
