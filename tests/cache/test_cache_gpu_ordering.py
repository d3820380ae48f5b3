"""The cache engine never stores or serves KV a device is still writing or reading (GPU only).

Each test queues a long kernel on the engine's current stream (as a running forward pass would) and then stores or
loads through the cache; the bytes that end up in another engine's blocks must equal the torch reference gather.
Uses only the API kvport has had since its first release (CacheEngine, bind, store, load), so the same file shows
the failure on a build without completions: there the gather was only launched when store() committed the L1 slot
and wrote it to disk, and a load released its L1 slot while the scatter still read it."""

from __future__ import annotations

import pytest
import torch

from kvport.cache import CacheEngine, load_config
from kvport.layouts import allocate, load_layout
from kvport.testing.gpu import backend_or_skip, reference_gather

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA or ROCm device"),
]

CHUNK = 256
# ~0.5 s at the H200's 1.98 GHz: far longer than the host needs to launch, commit, checksum and write a chunk.
SLEEP_CYCLES = 1_000_000_000
LAYOUTS = ["vllm-flash-nhd", "vllm-flash-hnd", "vllm-mla"]


def _kv(name: str, chunks: int, seed: int | None):
    spec = load_layout(name, layers=8)
    blocks = [(chunks + 2) * CHUNK // g.tokens_per_block for g in spec.groups]
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    fill = "random" if seed is not None else "zeros"
    return allocate(spec, blocks if len(blocks) > 1 else blocks[0], device="cuda", generator=gen, fill=fill)


def _tables(descriptor, first_block: int, tokens: int):
    return [list(range(first_block, first_block + tokens // g.tokens_per_block)) for g in descriptor.groups]


@pytest.mark.parametrize("async_store", [True, False], ids=["async-store", "sync-store"])
@pytest.mark.parametrize("backend_name", ["cuda", "triton"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_store_waits_for_the_kv_the_stream_is_still_writing(tmp_path, layout, backend_name, async_store):
    backend = backend_or_skip(backend_name)
    src = _kv(layout, 4, seed=1)
    cfg = load_config(
        overrides={"chunk_tokens": CHUNK, "l1_bytes": "512MiB", "l2_path": str(tmp_path), "async_store": async_store},
        environ={},
    )
    first = _tables(src.descriptor, 0, 2 * CHUNK)
    second = _tables(src.descriptor, 2 * (CHUNK // src.descriptor.groups[0].tokens_per_block), 2 * CHUNK)
    with CacheEngine(cfg, f"order-{layout}") as writer:
        writer.bind(src.descriptor, backend)
        assert writer.store(list(range(2 * CHUNK)), first) == 2 * CHUNK  # steady state: tables compiled
        torch.cuda._sleep(SLEEP_CYCLES)  # a long forward pass...
        for storage in src.storages:  # ...that then writes the KV the next store must capture
            storage.random_(0, 256)
        tokens = [7, *range(2 * CHUNK - 1)]
        assert writer.store(tokens, second) == 2 * CHUNK
        writer.flush()
    expected = reference_gather(src.descriptor, second, 2 * CHUNK)
    dst = _kv(layout, 4, seed=None)
    target = _tables(dst.descriptor, 0, 2 * CHUNK)
    with CacheEngine(cfg, f"order-{layout}") as reader:
        reader.bind(dst.descriptor, backend)
        assert reader.load(tokens, target, 2 * CHUNK) == 2 * CHUNK
    torch.cuda.synchronize()
    got = reference_gather(dst.descriptor, target, 2 * CHUNK)
    assert torch.equal(got, expected), f"{int((got != expected).sum())} of {got.numel()} bytes differ"


@pytest.mark.parametrize("backend_name", ["cuda", "triton"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_load_keeps_its_l1_slots_until_the_scatter_read_them(tmp_path, layout, backend_name):
    backend = backend_or_skip(backend_name)
    chunks = 6
    src = _kv(layout, chunks, seed=2)
    tokens = list(range(chunks * CHUNK))
    tables = _tables(src.descriptor, 0, chunks * CHUNK)
    base = {"chunk_tokens": CHUNK, "l2_path": str(tmp_path), "prefetch_depth": 4}
    warm = [9, *range(CHUNK - 1)]  # a one-chunk prefix the reader loads first
    with CacheEngine(load_config(overrides=base | {"l1_bytes": "1GiB"}, environ={}), f"load-{layout}") as writer:
        writer.bind(src.descriptor, backend)
        assert writer.store(tokens, tables) == chunks * CHUNK
        assert writer.store(warm, tables) == CHUNK
        writer.flush()
    expected = reference_gather(src.descriptor, tables, chunks * CHUNK)
    dst = _kv(layout, chunks, seed=None)
    slot = -(-src.descriptor.canonical_bytes(CHUNK) // 4096) * 4096
    # Two L1 slots for six chunks read ahead from disk: slots are reused while earlier scatters may still run.
    small = load_config(overrides=base | {"l1_bytes": 2 * slot}, environ={})
    with CacheEngine(small, f"load-{layout}") as reader:
        reader.bind(dst.descriptor, backend)
        # Steady state: segment tables compiled (their first upload would otherwise sync the host to the stream).
        assert reader.load(warm, tables, CHUNK) == CHUNK
        torch.cuda._sleep(SLEEP_CYCLES)  # the engine's stream is busy: every scatter queues behind this
        assert reader.load(tokens, tables, chunks * CHUNK) == chunks * CHUNK
    torch.cuda.synchronize()
    got = reference_gather(dst.descriptor, tables, chunks * CHUNK)
    assert torch.equal(got, expected), f"{int((got != expected).sum())} of {got.numel()} bytes differ"
