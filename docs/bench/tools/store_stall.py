"""Device: how long the engine's stream waits for one store when it is ordered after it (the vLLM worker's pattern:
store issued after the forward, ``completion.wait_on()`` before the next), against the store's whole duration.
Runs on trees before and after the split of ``wait_on`` (A/B). usage: store_stall.py LAYOUT TOKENS [N]"""

import random
import statistics
import sys

import torch

from kvport.bench._kernel_cases import sized_layout
from kvport.bench.kernels import BENCH_DIMS
from kvport.cache import CacheEngine, load_config
from kvport.layouts import allocate

layout, tokens = sys.argv[1], int(sys.argv[2])
N = int(sys.argv[3]) if len(sys.argv) > 3 else 7
spec = sized_layout(layout, BENCH_DIMS)
need = [-(-tokens // g.tokens_per_block) for g in spec.groups]
nb = [2 * n + 2 for n in need]
kv = allocate(spec, nb if len(nb) > 1 else nb[0], device="cuda", fill="zeros")
ids = [random.Random(0).sample(range(b), n) for b, n in zip(nb, need)]
ids = ids[0] if len(ids) == 1 else ids
nbytes = kv.descriptor.canonical_bytes(tokens)
engine = CacheEngine(
    load_config(overrides={"chunk_tokens": 256, "l1_bytes": max(4 << 30, 3 * nbytes)}, environ={}), "stall"
)
engine.bind(kv.descriptor)
stalls, wholes = [], []
for i in range(N + 1):
    torch.cuda.synchronize()
    begin, released, landed = (torch.cuda.Event(enable_timing=True) for _ in range(3))
    begin.record()
    ticket = engine.submit_store([i, *range(tokens - 1)], ids, tokens)
    ticket.completion.wait_on()
    released.record()
    getattr(ticket.completion, "wait_on_all", ticket.completion.wait_on)()
    landed.record()
    ticket.wait()
    torch.cuda.synchronize()
    if i:
        stalls.append(begin.elapsed_time(released))
        wholes.append(begin.elapsed_time(landed))
path = engine.mover.path_for("d2h", 256, tokens // 256)
print(
    f"{layout:16} {tokens:6} {nbytes / 2**20:8.1f} MiB  path {path:8} engine stream waits "
    f"{statistics.median(stalls):8.3f} ms  store ends {statistics.median(wholes):8.3f} ms  (medians of {N})"
)
engine.close()
