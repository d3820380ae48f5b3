"""Device-only: host time of one staged transfer per layout (cProfile of Transfer.to_host, default 256 tokens) and
time of the gather alone (CUDA events), to separate host-bound from kernel-bound."""

import cProfile
import io
import pstats
import random
import sys
import time

import torch

from kvport.bench._kernel_cases import Bench
from kvport.bench.kernels import BENCH_DIMS, GEMM_N

tokens = int(sys.argv[1]) if len(sys.argv) > 1 else 256
for name in sys.argv[2:] or ["deepseek-v4", "vllm-mla", "vllm-flash-nhd"]:
    b = Bench([name], [tokens], ["d2h"], ["staged"], ["none"], ["cuda"], 5, BENCH_DIMS, GEMM_N)
    ((_, spec, allocate),) = list(b._layouts())
    need = [-(-tokens // g.tokens_per_block) for g in spec.groups]
    nb = [2 * n + 2 for n in need]
    kv = allocate(spec, nb if len(nb) > 1 else nb[0], device=b.device, fill="zeros")
    rng = random.Random(0)
    ids = [rng.sample(range(x), n) for x, n in zip(nb, need)]
    d = kv.descriptor
    nbytes = d.canonical_bytes(tokens)
    used, one = b._enqueue(d, ids, tokens, "d2h", "cuda", "staged", nbytes)
    staging = torch.empty(nbytes, dtype=torch.uint8, device=b.device)
    backend = b.backends["cuda"]
    for _ in range(20):
        one()
        backend.gather(d, ids, staging, tokens)
    torch.cuda.synchronize()
    N = 200
    t0 = time.perf_counter()
    for _ in range(N):
        one()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / N
    t0 = time.perf_counter()
    for _ in range(N):
        backend.gather(d, ids, staging, tokens)
    host_g = (time.perf_counter() - t0) / N
    torch.cuda.synchronize()
    gwall = (time.perf_counter() - t0) / N
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(N):
        backend.gather(d, ids, staging, tokens)
    e.record()
    torch.cuda.synchronize()
    print(
        f"== {name} {tokens} tok, {nbytes / 2**20:.2f} MiB, {len(d.streams)} streams, groups {len(spec.groups)}: "
        f"to_host wall {wall * 1e6:.0f} us/op (link {nbytes / 55e9 * 1e6:.0f} us); gather host {host_g * 1e6:.0f} us, "
        f"gather wall {gwall * 1e6:.0f} us, gather events {s.elapsed_time(e) / N * 1e3:.0f} us",
        flush=True,
    )
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(N):
        one()
    torch.cuda.synchronize()
    pr.disable()
    out = io.StringIO()
    pstats.Stats(pr, stream=out).sort_stats("tottime").print_stats(16)
    print(out.getvalue()[-3800:], flush=True)
