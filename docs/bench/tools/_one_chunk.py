"""Setup shared by this folder's cache tools: a CacheEngine bound to KV of one catalog layout at the benchmark's
model size, and the block ids of one 256-token chunk. Tool scaffolding for `python3 docs/bench/tools/X.py`."""

import random

from kvport.bench._kernel_cases import sized_layout
from kvport.bench.kernels import BENCH_DIMS
from kvport.cache import CacheEngine, load_config
from kvport.layouts import allocate

CHUNK = 256


def one_chunk_engine(layout: str, name: str, device: str = "cuda"):
    """(kv, block ids of one chunk: a list, or one list per group, engine with a 4 GiB L1, bound to kv)."""
    spec = sized_layout(layout, BENCH_DIMS)
    need = [-(-CHUNK // g.tokens_per_block) for g in spec.groups]
    nb = [2 * n + 2 for n in need]
    kv = allocate(spec, nb if len(nb) > 1 else nb[0], device=device, fill="zeros")
    ids = [random.Random(0).sample(range(b), n) for b, n in zip(nb, need)]
    ids = ids[0] if len(ids) == 1 else ids
    engine = CacheEngine(load_config(overrides={"chunk_tokens": CHUNK, "l1_bytes": "4GiB"}, environ={}), name)
    engine.bind(kv.descriptor)
    return kv, ids, engine
