"""One-call chunks on a GPU (staged, and DMA chunks, which order themselves the same way): the native call's own
stream ordering (the engine's current stream, an explicit ``after``, staging slots handed between the kernel and copy
streams) and the platform's raw handles it relies on."""

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


def _warm(transfer, d, ids, host, tokens, path="staged"):
    """Tables compiled, staging and every block-id slot allocated (DMA: its region template and engine-order event):
    a first call synchronizes the host on the way (pinned and device allocations, table uploads), which would hide a
    missing stream wait."""
    for _ in range(SLOTS + 1):
        transfer.to_host(d, ids, host, tokens, path=path).synchronize()


def _write_later(d, value):
    """On the current stream: the ~50 ms sleep, then every KV buffer of ``d`` filled with ``value``."""
    torch.cuda._sleep(SLEEP)
    for stream in d.streams:
        stream.buffer.view(torch.uint8).fill_(value)


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


@pytest.mark.parametrize("path", ["staged", "dma"])
@pytest.mark.parametrize("layout", ["deepseek-v4", "vllm-mla", "vllm-flash-nhd"])
def test_waits_for_the_engines_current_side_stream(layout, path):
    """The engine computes on a stream of its own: the one call orders the gather after the KV write queued there,
    on every call (the engine-order event is reused)."""
    _gather_after_engine_writes(layout, path, torch.cuda.Stream())


@pytest.mark.parametrize("path", ["staged", "dma"])
def test_waits_for_the_legacy_default_stream(path):
    """An engine on torch's default stream (the legacy stream, raw handle 0): the native call's query and wait take
    that handle too."""
    default = torch.cuda.default_stream()
    assert default.cuda_stream == 0
    _gather_after_engine_writes("vllm-flash-nhd", path, default)


def _gather_after_engine_writes(layout, path, engine):
    tokens = 64
    d, ids, transfer = _setup(layout, tokens)
    host = torch.zeros(d.canonical_bytes(tokens), dtype=torch.uint8).pin_memory()
    _warm(transfer, d, ids, host, tokens, path)
    for value in (0x5A, 0x6B):
        with torch.cuda.stream(engine):
            _write_later(d, value)
            result = transfer.to_host(d, ids, host, tokens, path=path)
        assert result.path == path
        result.synchronize()
        assert bool((host == value).all()), f"the one-call {path} gather read KV before the engine's stream wrote it"


@pytest.mark.parametrize("path", ["staged", "dma"])
def test_explicit_after_stream_orders_the_one_call(path):
    tokens = 64
    d, ids, transfer = _setup("deepseek-v4", tokens)
    host = torch.zeros(d.canonical_bytes(tokens), dtype=torch.uint8).pin_memory()
    _warm(transfer, d, ids, host, tokens, path)
    writer = torch.cuda.Stream()
    with torch.cuda.stream(writer):
        _write_later(d, 0x33)
    transfer.to_host(d, ids, host, tokens, path=path, after=writer).synchronize()
    assert bool((host == 0x33).all()), f"the one-call {path} gather did not wait for the explicit after stream"


def test_dma_load_waits_for_the_engines_stream_and_round_trips():
    """A DMA load (scatter) issued after engine work on the current stream lands after it: the engine's own write
    of the same blocks, queued first, is overwritten by the chunk, byte for byte as the reference gather reads."""
    tokens = 64
    d, ids, transfer = _setup("vllm-flash-nhd", tokens)
    want = torch.randint(0, 256, (d.canonical_bytes(tokens),), dtype=torch.uint8).pin_memory()
    _warm(transfer, d, ids, torch.zeros_like(want).pin_memory(), tokens, "dma")
    engine = torch.cuda.Stream()
    with torch.cuda.stream(engine):
        _write_later(d, 0x11)
        result = transfer.from_host(want, d, ids, tokens, path="dma")
    assert result.path == "dma"
    result.synchronize()
    assert torch.equal(_expect(d, ids, tokens), want), "the DMA scatter ran before the engine's write, or wrongly"


@pytest.mark.parametrize("direction", ["d2h", "h2d"])
def test_one_call_right_after_a_multi_piece_move(direction):
    """A multi-piece d2h move drains its staging on the DMA stream while a one-call chunk issued right after runs
    its kernels (h2d: the same moves the other way); neither may touch the other's bytes. Pieces of 32 MiB: each
    drain copy takes ~0.6 ms of link, the one-call gather of 32 MiB ~0.03 ms of HBM, so a one-call chunk that
    shared the first piece's buffer without waiting would overwrite it while it is being copied out."""
    big, small = 768, 256
    dims = {"layers": 32, "kv_heads": 8, "head_dim": 128}  # Llama-3-8B-sized KV: 128 KiB per token
    d, ids, _ = _setup("vllm-flash-nhd", big, **dims)
    piece = d.canonical_bytes(small)
    model = CostModel(piece_bytes=piece, min_piece_bytes=piece)
    d, ids, transfer = _setup("vllm-flash-nhd", big, model, **dims)
    assert len(transfer.staged.piece_list(d, big)) == 3 and transfer._fits_one_call(d, [(ids, None)], small)
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


@pytest.mark.parametrize("direction", ["d2h", "h2d"])
@pytest.mark.parametrize("layout", ["deepseek-v4", "vllm-mla"])
def test_consecutive_chunks_reuse_a_slot_only_after_its_reader(layout, direction):
    """Chunks alternate between two staging slots, kernels on one stream and host copies on the other. With the
    slots' readers held behind a sleep (d2h: the copies; h2d: the kernels), the third chunk must not refill slot 0
    before the first chunk's reader emptied it; every chunk moves its own blocks."""
    from kvport.hal.transfer.one_call import STAGING_SLOTS

    chunks = 2 * STAGING_SLOTS + 1
    tokens = 64
    d, _, transfer = _setup(layout, tokens)
    need = [-(-tokens // g.tokens_per_block) for g in d.groups]
    # Disjoint blocks per chunk, so a chunk that moved through another's slot contents cannot pass.
    kv = allocate(
        load_layout(layout),
        [chunks * n + 1 for n in need] if len(need) > 1 else chunks * need[0] + 1,
        device="cuda",
        generator=torch.Generator().manual_seed(3),
    )
    d = kv.descriptor
    rng = random.Random(3)
    order = [rng.sample(range(chunks * n + 1), chunks * n + 1) for n in need]
    tables = [[order[g][c * n : (c + 1) * n] for g, n in enumerate(need)] for c in range(chunks)]
    nbytes = d.canonical_bytes(tokens)
    hosts = [torch.empty(nbytes, dtype=torch.uint8).pin_memory() for _ in range(chunks)]

    def issue(host, table):
        if direction == "d2h":
            return transfer.to_host(d, table, host, tokens, path="staged")
        return transfer.from_host(host, d, table, tokens, path="staged")

    for _ in range(SLOTS + 1):  # warm: tables, both slots, every block-id slot
        issue(hosts[0], tables[0]).synchronize()
    for c, host in enumerate(hosts):
        host.copy_(torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=torch.Generator().manual_seed(c)))
    held = transfer.dma_stream if direction == "d2h" else transfer.kernel_stream
    with torch.cuda.stream(held):
        torch.cuda._sleep(SLEEP)
    results = [issue(host, table) for host, table in zip(hosts, tables)]
    assert all(r.path == "staged" for r in results)
    torch.cuda.synchronize()
    for c, (host, table) in enumerate(zip(hosts, tables)):
        assert torch.equal(host, _expect(d, table, tokens)), f"{layout} {direction}: chunk {c} lost its bytes"


@pytest.mark.parametrize("one_call", [True, False])
def test_a_store_releases_engine_memory_before_its_copy_lands(one_call):
    """``wait_on`` orders the engine's stream after a staged store's gathers only, so the engine's next forward does
    not wait for the copy to the host; ``wait_on_all`` and the completion itself wait for the copy; the bytes are
    the blocks' as they were gathered. One call: the copy is held behind a sleep on the copy stream. Pieces (three
    of 32 MiB, Llama-3-8B-sized KV): the copies take ~1.8 ms of link, the gathers ~0.1 ms."""
    if one_call:
        tokens, dims, model = 64, {}, None
    else:
        tokens, dims = 768, {"layers": 32, "kv_heads": 8, "head_dim": 128}
        d, _, _ = _setup("vllm-flash-nhd", tokens, **dims)
        piece = d.canonical_bytes(256)
        model = CostModel(piece_bytes=piece, min_piece_bytes=piece)
    d, ids, transfer = _setup("vllm-flash-nhd", tokens, model, **dims)
    assert transfer._fits_one_call(d, [(ids, None)], tokens) == one_call
    host = torch.zeros(d.canonical_bytes(tokens), dtype=torch.uint8).pin_memory()
    _warm(transfer, d, ids, host, tokens)
    want = _expect(d, ids, tokens)
    if one_call:
        with torch.cuda.stream(transfer.dma_stream):
            torch.cuda._sleep(SLEEP)
    result = transfer.to_host(d, ids, host, tokens, path="staged")
    result.completion.wait_on()
    released = torch.cuda.Event()
    released.record()
    for stream in d.streams:  # the engine overwrites its blocks once released, while the copy still runs
        stream.buffer.view(torch.uint8).fill_(0x11)
    result.completion.wait_on_all()
    landed = torch.cuda.Event()
    landed.record()
    released.synchronize()
    assert not landed.query() and not result.completion.done(), "wait_on waited for the copy to the host"
    torch.cuda.synchronize()
    assert result.completion.done() and torch.equal(host, want)
