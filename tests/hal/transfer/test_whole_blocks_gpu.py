"""Whole-block chunks on the GPU (kvport.layouts.whole_blocks): every path and copy backend moves a block-outer
layout's whole blocks byte for byte both ways, and the planner keeps them on the copy engines at any size unless the
engine waits for the release."""

from __future__ import annotations

import random

import pytest

torch = pytest.importorskip("torch")

from kvport.hal.transfer.executor import Transfer  # noqa: E402
from kvport.kernels.torch.gather import gather as ref_gather  # noqa: E402
from kvport.layouts import allocate, load_layout  # noqa: E402
from kvport.layouts.whole_blocks import whole_blocks  # noqa: E402
from kvport.testing.gpu import backend_or_skip, native_or_none  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA or ROCm device"),
]

LAYOUTS = {
    "vllm-std-blnhc": dict(layers=8, kv_heads=8, head_dim=128),
    "vllm-std-blhnc": dict(layers=8, kv_heads=8, head_dim=128),
    "vllm-std-mla-block-outer": dict(layers=8),
}


def _blocks(name: str, tokens: int, seed: int):
    spec = load_layout(name, **LAYOUTS[name])
    per = -(-tokens // spec.groups[0].tokens_per_block)
    kv = allocate(spec, 2 * per + 3, device="cuda", generator=torch.Generator().manual_seed(seed))
    rng = random.Random(seed)
    ids = rng.sample(range(2 * per + 3), per)
    fresh = [b for b in range(2 * per + 3) if b not in ids][:per]
    return whole_blocks(kv.descriptor), ids, fresh


@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("backend_name", ["cuda", "triton"])
@pytest.mark.parametrize("path", ["dma", "staged", "zero-copy"])
def test_whole_blocks_round_trip_on_every_path(name: str, backend_name: str, path: str) -> None:
    native = native_or_none()
    if path == "dma" and native is None:
        pytest.skip("the DMA path needs the native module")
    transfer = Transfer(backend_or_skip(backend_name), "cuda", native=native)
    tokens = 16 * 16 + 5  # a partial last block: copied whole
    d, ids, fresh = _blocks(name, tokens, seed=len(name) + len(path))
    host = torch.zeros(d.canonical_bytes(tokens), dtype=torch.uint8, pin_memory=True)
    transfer.to_host(d, ids, host, tokens, path=path).synchronize()
    expect = torch.empty(host.numel(), dtype=torch.uint8)
    ref_gather(d, ids, expect, tokens)
    assert torch.equal(host, expect)
    transfer.from_host(host, d, fresh, tokens, path=path).synchronize()
    back = torch.empty_like(expect)
    ref_gather(d, fresh, back, tokens)
    assert torch.equal(back, expect)


def test_the_planner_keeps_whole_blocks_on_the_copy_engines():
    native = native_or_none()
    if native is None or not native.batched_copies:
        pytest.skip("needs the native module with batched copy calls")
    spec = load_layout("vllm-std-blhnc", layers=32, kv_heads=8, head_dim=128)
    d = whole_blocks(allocate(spec, 40, device="cuda", fill="zeros").descriptor)  # 2 MiB blocks
    transfer = Transfer(backend_or_skip("cuda"), "cuda", native=native)
    for direction in ("d2h", "h2d"):
        assert transfer.plan(d, 256, direction).path == "dma"
        assert transfer.plan(d, 256, direction, chunks=32).path == "dma"  # 8K tokens, 1 GiB in 512 regions
        assert transfer.plan(d, 256, direction, engine_waits=True).path == "staged"
