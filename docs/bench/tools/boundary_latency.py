"""Device: how long one chunk store / load takes when ordered after the engine's own stream, as the vLLM worker
orders it, against a plain pinned memcpy of the same bytes issued the same way; alone and with the engine's stream
running 8192^3 GEMMs before and after it (the next "forward" waits for the store's release / the load, as in vLLM).

`kvport bench kernels --load gemm` runs its GEMMs on a stream of their own, so a transfer's kernels wait for SMs at
some random point of a 1.6 ms GEMM. Here the transfer becomes ready at a kernel boundary of the engine's stream (the
end of the forward that wrote the KV), where a high-priority stream gets the SMs first. Latency = from that boundary
(an event recorded on the engine stream) to the transfer's last byte, median of N; ratio = memcpy / kvport.
usage: boundary_latency.py [N] [LAYOUT ...]"""

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
    """Latency in ms of one transfer ordered after the engine stream, with GEMMs around it when ``load``."""
    ready, done = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    if load:
        gemm()
    ready.record(engine)
    if kind == "memcpy":
        side.wait_event(ready)
        with torch.cuda.stream(side):
            (host.copy_(dev_flat, non_blocking=True) if direction == "d2h" else dev_flat.copy_(host, non_blocking=True))
        done.record(side)
        if direction == "h2d":
            engine.wait_stream(side)
    else:
        if direction == "d2h":
            res = transfer.to_host(d, ids, host, tokens, path="auto")
        else:
            res = transfer.from_host(host, d, ids, tokens, path="auto")
        res.completion.wait_on(engine)  # the vLLM worker's order: the next forward after the store's release
        res.completion.wait_on_all(side)
        done.record(side)
    if load:
        gemm()  # the next forward: after the store's release, or after the load (wait_on above)
    torch.cuda.synchronize()
    return ready.elapsed_time(done)


for name in LAYOUTS:
    spec = sized_layout(name, BENCH_DIMS)
    for tokens in (256, 8192):
        need = [-(-tokens // g.tokens_per_block) for g in spec.groups]
        nb = [2 * n + 2 for n in need]
        kv = allocate(spec, nb if len(nb) > 1 else nb[0], device="cuda", fill="zeros")
        ids = [random.Random(0).sample(range(x), n) for x, n in zip(nb, need)]
        ids = ids[0] if len(ids) == 1 else ids
        d = kv.descriptor
        nbytes = d.canonical_bytes(tokens)
        host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        dev_flat = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        path = transfer.plan(d, tokens, "d2h").path
        for direction in ("d2h", "h2d"):
            for load in (False, True):
                got = {}
                for kind in ("memcpy", "kvport", "memcpy", "kvport"):  # interleaved; first round warms up
                    got[kind] = [one(kind, direction, d, ids, tokens, host, dev_flat, load) for _ in range(N)]
                mc, kp = statistics.median(got["memcpy"]), statistics.median(got["kvport"])
                print(
                    f"{name:16s} {tokens:5d} {direction} {path:7s} {'engine GEMMs' if load else 'alone':12s} "
                    f"memcpy {mc:7.3f} ms  kvport {kp:7.3f} ms  ratio {mc / kp:5.3f}",
                    flush=True,
                )
        del kv, host, dev_flat
        torch.cuda.empty_cache()
