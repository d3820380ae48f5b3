"""A Transfer plans with what its native build can do (GPU only): a build with batched copy calls takes the copy
engines for 256-token NHD chunks, one that copies region by region (HIP, CUDA < 12.8) stages them, and a requested
DMA path is still honoured (the copies themselves are this device's build's; the per-region loop is compiled and
imported by the build tests, not run here)."""

from __future__ import annotations

import random

import pytest

torch = pytest.importorskip("torch")

from kvport.hal.transfer.executor import Transfer  # noqa: E402
from kvport.kernels.torch.gather import gather as ref_gather  # noqa: E402
from kvport.layouts import allocate, load_layout  # noqa: E402
from kvport.testing.gpu import backend_or_skip, native_or_none  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA or ROCm device"),
]


class _RegionByRegion:
    """The real native backend, reporting a build without batched calls (what a HIP build reports)."""

    batched_copies = False

    def __init__(self, real):
        self.real = real

    def __getattr__(self, name):
        return getattr(self.real, name)


def test_plan_follows_the_builds_copy_calls():
    native = native_or_none()
    if native is None:
        pytest.skip("the DMA path needs the native module")
    backend = backend_or_skip("cuda")
    # Llama-3-8B-shaped: 32 MiB per 256-token chunk, above zero-copy's limit, so the choice is DMA or staged.
    spec = load_layout("vllm-flash-nhd", layers=32, kv_heads=8, head_dim=128)
    tokens = 256
    per = tokens // spec.groups[0].tokens_per_block
    kv = allocate(spec, 2 * per + 1, device="cuda", generator=torch.Generator().manual_seed(9))
    d = kv.descriptor
    ids = random.Random(9).sample(range(2 * per + 1), per)
    batched = Transfer(backend, "cuda", native=native)
    assert batched.dma_batched is native.batched_copies
    if native.batched_copies:
        assert batched.plan(d, tokens, "d2h").path == "dma"
    per_region = Transfer(backend, "cuda", native=_RegionByRegion(native))
    assert per_region.dma_batched is False
    for direction in ("d2h", "h2d"):
        chosen = per_region.plan(d, tokens, direction)
        assert chosen.path == "staged", chosen.reason
        assert "one copy call per region" in chosen.reason
    host = torch.zeros(d.canonical_bytes(tokens), dtype=torch.uint8, pin_memory=True)
    per_region.to_host(d, ids, host, tokens, path="dma").synchronize()
    expect = torch.empty(host.numel(), dtype=torch.uint8)
    ref_gather(d, ids, expect, tokens)
    assert torch.equal(host, expect)


def test_engine_waits_takes_the_staged_path_where_it_releases_first():
    """A move the engine waits for (vLLM's loads): staged, which gives engine memory back first (a store after its
    last gather, a load once its scatters ran), with or without one-call chunks; otherwise the planner's rule."""
    native = native_or_none()
    if native is None or not native.batched_copies:
        pytest.skip("needs the native module with batched copy calls")
    spec = load_layout("vllm-flash-nhd", layers=32, kv_heads=8, head_dim=128)
    d = allocate(spec, 40, device="cuda", fill="zeros").descriptor
    one_call = Transfer(backend_or_skip("cuda"), "cuda", native=native)
    for direction in ("d2h", "h2d"):
        assert one_call.plan(d, 256, direction, engine_waits=True).path == "staged"
        assert one_call.plan(d, 256, direction).path == "dma"
        assert one_call.plan(d, 256, direction, chunks=8, engine_waits=True).path == "staged"
        assert one_call.plan(d, 256, direction, chunks=8).path == "dma"
    triton = Transfer(backend_or_skip("triton"), "cuda", native=native)
    assert triton.plan(d, 256, "d2h", engine_waits=True).path == "staged"
