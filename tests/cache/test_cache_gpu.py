"""Cache engine on a real GPU: pinned L1, the registry's best backend gathering from and scattering into device KV.
Skips cleanly where torch sees no CUDA/ROCm device."""

from __future__ import annotations

import pytest
import torch

from kvport.cache import CacheEngine, load_config
from kvport.layouts import allocate, load_layout
from kvport.testing.gpu import reference_gather

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA or ROCm device"),
]


@pytest.mark.parametrize("name", ["vllm-flash-nhd", "vllm-mla", "deepseek-v4"])
def test_round_trip_device_kv_through_pinned_l1_and_disk(tmp_path, name):
    spec = load_layout(name)
    chunk = 256
    blocks = [4 * chunk // g.tokens_per_block + 4 for g in spec.groups]
    src = allocate(spec, blocks, device="cuda", generator=torch.Generator().manual_seed(0))
    dst = allocate(spec, blocks, device="cuda", fill="zeros")
    cfg = load_config(overrides={"chunk_tokens": chunk, "l1_bytes": "256MiB", "l2_path": str(tmp_path)}, environ={})
    tables = [list(range(3 * chunk // g.tokens_per_block)) for g in spec.groups]
    other = [[b + 2 for b in t] for t in tables]
    tokens = list(range(3 * chunk))
    with CacheEngine(cfg, f"gpu-{name}") as writer:
        writer.bind(src.descriptor)  # registry pick: native/Triton where available
        assert writer.l1.pinned and writer.l1.memory.is_pinned()
        assert writer.store(tokens, tables) == 3 * chunk
    with CacheEngine(cfg, f"gpu-{name}") as reader:
        reader.bind(dst.descriptor)
        assert reader.load(tokens, other, len(tokens)) == 3 * chunk
    a = reference_gather(src.descriptor, tables, 3 * chunk)
    b = reference_gather(dst.descriptor, other, 3 * chunk)
    assert torch.equal(a, b)
