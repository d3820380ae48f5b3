"""One-call staged chunks on a GPU: the native call's own stream ordering (the engine's current stream, an explicit
``after``, a drain still reading staging) and the platform's raw stream handles it relies on."""

from __future__ import annotations

import random

import pytest

torch = pytest.importorskip("torch")

from kvport.hal.platforms import platform_for_device  # noqa: E402
from kvport.hal.transfer.block_id_ring import SLOTS  # noqa: E402
from kvport.hal.transfer.executor import Transfer  # noqa: E402
from kvport.hal.transfer.planner import CostModel  # noqa: E402
from kvport.kernels.torch.gather import gather as ref_gather  # noqa: E402
from kvport.layouts import allocate, load_layout  # noqa: E402
from kvport.testing.gpu import backend_or_skip  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA or ROCm device"),
]

SLEEP = 100_000_000  # torch.cuda._sleep cycles: ~50 ms, long enough that an unordered copy would run first


def _setup(layout, tokens, model=None, **dims):
    native = backend_or_skip("cuda")
    spec = load_layout(layout, **dims)
    need = [-(-tokens // g.tokens_per_block) for g in spec.groups]
    blocks = [2 * n + 1 for n in need]
    kv = allocate(
        spec, blocks if len(blocks) > 1 else blocks[0], device="cuda", generator=torch.Generator().manual_seed(7)
    )
    rng = random.Random(7)
    ids = [rng.sample(range(b), n) for b, n in zip(blocks, need)]
    return kv.descriptor, ids, Transfer(native, "cuda", model, native=native)


def _warm(transfer, d, ids, host, tokens):
    """Tables compiled, staging and every block-id slot allocated: a first call synchronizes the host on the way
    (pinned and device allocations, table uploads), which would hide a missing stream wait."""
    for _ in range(SLOTS + 1):
        transfer.to_host(d, ids, host, tokens, path="staged").synchronize()


def _expect(d, ids, tokens):
    out = torch.empty(d.canonical_bytes(tokens), dtype=torch.uint8)
    ref_gather(d, ids, out, tokens)
    return out


def test_platform_handles_follow_the_current_stream():
    platform = platform_for_device(torch.device("cuda", 0))
    side = torch.cuda.Stream()
    for _ in range(2):  # the second round hits the platform's cached Stream objects
        assert platform.current_stream(torch.device("cuda", 0)) == torch.cuda.current_stream()
        assert platform.current_stream_handle(0) == torch.cuda.current_stream().cuda_stream
        with torch.cuda.stream(side):
            assert platform.current_stream(torch.device("cuda", 0)) == side
            assert platform.current_stream(0) == side
            assert platform.current_stream_handle(0) == side.cuda_stream


@pytest.mark.parametrize("layout", ["deepseek-v4", "vllm-mla"])
def test_waits_for_the_engines_current_side_stream(layout):
    """The engine computes on a stream of its own: the one call orders the gather after the KV write queued there."""
    tokens = 64
    d, ids, transfer = _setup(layout, tokens)
    host = torch.zeros(d.canonical_bytes(tokens), dtype=torch.uint8).pin_memory()
    _warm(transfer, d, ids, host, tokens)
    engine = torch.cuda.Stream()
    with torch.cuda.stream(engine):
        torch.cuda._sleep(SLEEP)
        for stream in d.streams:
            stream.buffer.view(torch.uint8).fill_(0x5A)
        result = transfer.to_host(d, ids, host, tokens, path="staged")
    result.synchronize()
    assert bool((host == 0x5A).all()), "the one-call gather read KV before the engine's stream wrote it"


def test_explicit_after_stream_orders_the_one_call():
    tokens = 64
    d, ids, transfer = _setup("deepseek-v4", tokens)
    host = torch.zeros(d.canonical_bytes(tokens), dtype=torch.uint8).pin_memory()
    _warm(transfer, d, ids, host, tokens)
    writer = torch.cuda.Stream()
    with torch.cuda.stream(writer):
        torch.cuda._sleep(SLEEP)
        for stream in d.streams:
            stream.buffer.view(torch.uint8).fill_(0x33)
    transfer.to_host(d, ids, host, tokens, path="staged", after=writer).synchronize()
    assert bool((host == 0x33).all()), "the one-call gather did not wait for the explicit after stream"


@pytest.mark.parametrize("direction", ["d2h", "h2d"])
def test_one_call_waits_for_a_drain_still_reading_staging(direction):
    """A multi-piece d2h move drains staging on the DMA stream; a one-call chunk issued right after gathers into the
    same staging buffer and must wait for that drain (h2d: the same moves the other way). Pieces of 32 MiB: each
    drain copy takes ~0.6 ms of link, the one-call gather of 32 MiB ~0.03 ms of HBM, so a gather that did not wait
    would overwrite the first piece while it is being copied out."""
    big, small = 768, 256
    dims = {"layers": 32, "kv_heads": 8, "head_dim": 128}  # Llama-3-8B-sized KV: 128 KiB per token
    d, ids, _ = _setup("vllm-flash-nhd", big, **dims)
    piece = d.canonical_bytes(small)
    model = CostModel(piece_bytes=piece, min_piece_bytes=piece)
    d, ids, transfer = _setup("vllm-flash-nhd", big, model, **dims)
    assert len(transfer._piece_list(d, big)) == 3 and transfer._fits_one_call(d, [(ids, None)], small)
    (table,) = d.normalize_block_ids(ids)
    spare = sorted(set(range(2 * len(table) + 1)) - set(table))  # blocks of neither move: disjoint bytes
    small_ids = spare[: -(-small // d.groups[0].tokens_per_block)]
    hosts = {n: torch.randint(0, 256, (d.canonical_bytes(n),), dtype=torch.uint8).pin_memory() for n in (big, small)}

    def issue(n, table):
        if direction == "d2h":
            return transfer.to_host(d, table, hosts[n], n, path="staged")
        return transfer.from_host(hosts[n], d, table, n, path="staged")

    for n, table in ((small, small_ids), (big, ids)):  # warm, so nothing below synchronizes the host
        for _ in range(SLOTS + 1):
            issue(n, table).synchronize()
        hosts[n].copy_(torch.randint(0, 256, hosts[n].shape, dtype=torch.uint8))
    a = issue(big, ids)
    b = issue(small, small_ids)
    assert b.path == "staged"
    a.synchronize()
    b.synchronize()
    torch.cuda.synchronize()
    assert torch.equal(hosts[big], _expect(d, ids, big)), f"{direction}: the multi-piece move lost bytes"
    assert torch.equal(hosts[small], _expect(d, small_ids, small)), f"{direction}: the one-call chunk lost bytes"
