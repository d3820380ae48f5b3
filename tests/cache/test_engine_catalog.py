"""Cache engine round trips over real catalog layouts (kvport.layouts): store from one engine-shaped KV, load into
another at different block ids, compare the canonical bytes both sides gather."""

from __future__ import annotations

import pytest
import torch

from kvport.cache import CacheEngine, load_config
from kvport.hal.backends.torch_ref import TorchBackend
from kvport.layouts import allocate, load_layout

CHUNK = 256
LAYOUTS = ["vllm-flash-nhd", "vllm-flash-hnd", "vllm-mla", "vllm-cpu-attn", "trtllm-pool", "sglang-mha", "deepseek-v4"]


def tables(desc, chunks: int, offset: int) -> list[list[int]]:
    out = []
    for g in desc.groups:
        n = chunks * CHUNK // g.tokens_per_block
        out.append([offset + (i * 7) % n for i in range(n)])  # shuffled, distinct block ids
    return out


@pytest.mark.parametrize("name", LAYOUTS)
def test_catalog_layout_round_trip(tmp_path, name):
    spec = load_layout(name)
    blocks = [2 * CHUNK * 3 // g.tokens_per_block + 8 for g in spec.groups]
    src = allocate(spec, blocks, generator=torch.Generator().manual_seed(0))
    dst = allocate(spec, blocks, fill="zeros")
    cfg = load_config(overrides={"chunk_tokens": CHUNK, "l1_bytes": "64MiB", "l2_path": str(tmp_path)}, environ={})
    tokens = list(range(CHUNK * 3 + 5))
    src_tables, dst_tables = tables(src.descriptor, 3, 0), tables(dst.descriptor, 3, 3)
    with CacheEngine(cfg, f"ns-{name}") as writer:
        writer.bind(src.descriptor, TorchBackend())
        assert writer.store(tokens, src_tables) == CHUNK * 3
    with CacheEngine(cfg, f"ns-{name}") as reader:
        reader.bind(dst.descriptor, TorchBackend())
        assert reader.load(tokens, dst_tables, len(tokens)) == CHUNK * 3
    backend = TorchBackend()
    size = src.descriptor.canonical_bytes(CHUNK * 3)
    a, b = torch.empty(size, dtype=torch.uint8), torch.empty(size, dtype=torch.uint8)
    backend.gather(src.descriptor, src_tables, a, CHUNK * 3)
    backend.gather(dst.descriptor, dst_tables, b, CHUNK * 3)
    assert torch.equal(a, b)
