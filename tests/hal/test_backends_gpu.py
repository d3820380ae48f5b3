"""GPU correctness of the Triton and native backends for every catalog layout and transfer path vs the torch oracle.
Skips cleanly without a GPU; run on the device with `pytest -m gpu`."""

from __future__ import annotations

import random
import zlib

import pytest

torch = pytest.importorskip("torch")

from kvport.hal.platform import detect_platform  # noqa: E402
from kvport.hal.transfer.block_id_ring import SLOTS  # noqa: E402
from kvport.hal.transfer.differential import buffers, check_gather, check_scatter, random_block_ids  # noqa: E402
from kvport.hal.transfer.executor import Transfer  # noqa: E402
from kvport.hal.transfer.planner import CostModel  # noqa: E402
from kvport.hal.transfer.samples import SAMPLES, Dims, sample  # noqa: E402
from kvport.layouts import allocate, catalog_names, load_layout  # noqa: E402
from kvport.testing.gpu import backend_or_skip, native_or_none  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA or ROCm device"),
]

BACKENDS = ["triton", "cuda"]
MODES = ["device", "dma", "staged", "zero-copy"]


def _kv(name, seed, extra_tokens=5):
    spec = load_layout(name)
    tokens = 3 * max(g.tokens_per_block for g in spec.groups) + extra_tokens
    need = [-(-tokens // g.tokens_per_block) for g in spec.groups]
    blocks = [2 * n + 1 for n in need]
    kv = allocate(
        spec, blocks if len(blocks) > 1 else blocks[0], device="cuda", generator=torch.Generator().manual_seed(seed)
    )
    rng = random.Random(seed)
    ids = [rng.sample(range(b), n) for b, n in zip(blocks, need)]
    return kv, ids, tokens


class HostPath:
    """Backend-shaped adapter that runs a gather/scatter through Transfer on one host path."""

    def __init__(self, transfer, path):
        self.transfer, self.path = transfer, path

    def gather(self, descriptor, ids, dst, num_tokens):
        host = torch.empty(dst.numel(), dtype=torch.uint8, pin_memory=True)
        host.copy_(dst)
        result = self.transfer.to_host(descriptor, ids, host, num_tokens, path=self.path)
        assert result.path == self.path
        result.synchronize()
        dst.copy_(host)
        return result.completion

    def scatter(self, src, descriptor, ids, num_tokens):
        host = torch.empty(src.numel(), dtype=torch.uint8, pin_memory=True)
        host.copy_(src)
        result = self.transfer.from_host(host, descriptor, ids, num_tokens, path=self.path)
        assert result.path == self.path
        result.synchronize()
        return result.completion


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("layout", catalog_names())
def test_layout_backend_path(layout, backend_name, mode):
    backend = backend_or_skip(backend_name)
    # crc32, not hash(): str hashes change per process (PYTHONHASHSEED), so a failure could not be replayed.
    kv, ids, tokens = _kv(layout, seed=zlib.crc32(f"{layout}/{backend_name}/{mode}".encode()) % 1000)
    if mode == "device":
        check_gather(backend, kv.descriptor, ids, tokens, "cuda")
        check_scatter(backend, kv.descriptor, ids, tokens, "cuda")
        return
    native = native_or_none()
    if mode == "dma" and native is None:
        pytest.skip("DMA path needs the native module")
    # Small pieces so the staged pipeline really alternates its two staging buffers.
    transfer = Transfer(backend, "cuda", CostModel(piece_bytes=4096), native=native)
    adapter = HostPath(transfer, mode)
    check_gather(adapter, kv.descriptor, ids, tokens, "cpu")
    check_scatter(adapter, kv.descriptor, ids, tokens, "cpu")


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("mode", ["dma", "staged", "zero-copy"])
def test_gather_waits_for_the_engine_stream(backend_name, mode):
    """KV written by queued work on the compute stream must be what the transfer reads."""
    backend = backend_or_skip(backend_name)
    native = native_or_none()
    if mode == "dma" and native is None:
        pytest.skip("DMA path needs the native module")
    kv, ids, tokens = _kv("vllm-flash-nhd", seed=5)
    transfer = Transfer(backend, "cuda", native=native)
    host = torch.zeros(kv.descriptor.canonical_bytes(tokens), dtype=torch.uint8, pin_memory=True)
    # Warm: a first call compiles tables and allocates pinned and device buffers, which synchronizes the host and
    # would hide a missing stream wait; the one-call path also fills all its block-id slots.
    for _ in range(SLOTS + 1):
        transfer.to_host(kv.descriptor, ids, host, tokens, path=mode).synchronize()
    host.zero_()
    torch.cuda.synchronize()
    torch.cuda._sleep(100_000_000)  # ~50 ms of queued "forward pass" before the write lands
    for buf in buffers(kv.descriptor):
        buf.fill_(0x3C)
    result = transfer.to_host(kv.descriptor, ids, host, tokens, path=mode)
    result.synchronize()
    assert bool((host == 0x3C).all()), "transfer read KV before the compute stream wrote it"


def test_native_expected_when_built_for_cuda():
    from kvport.hal.native import read_build_info

    info = read_build_info() or {}
    if info.get("target") != "cuda":
        pytest.skip("native module not built for cuda here")
    backend = backend_or_skip("cuda")
    assert backend.expected(detect_platform())


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("layout", ["vllm-flash-hnd", "deepseek-v4"])
def test_single_piece_staged(layout, backend_name):
    """Default pieces are larger than these transfers: the one-stream staged variant must be exact too."""
    backend = backend_or_skip(backend_name)
    kv, ids, tokens = _kv(layout, seed=11)
    adapter = HostPath(Transfer(backend, "cuda", native=native_or_none()), "staged")
    check_gather(adapter, kv.descriptor, ids, tokens, "cpu")
    check_scatter(adapter, kv.descriptor, ids, tokens, "cpu")


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_samples_short_odd_rows(name, backend_name):
    """mla_odd has rows shorter than a warp and not a power of two long (12-byte scale runs, 36-byte rows at a
    40-byte stride): lanes past such a row must neither copy nor write the padding after it."""
    backend = backend_or_skip(backend_name)
    for tokens in (7, 23):
        descriptor = sample(name, Dims(), device="cuda", seed=tokens)
        ids = random_block_ids(descriptor, tokens, random.Random(tokens), Dims().blocks)
        check_gather(backend, descriptor, ids, tokens, "cuda")
        check_scatter(backend, descriptor, ids, tokens, "cuda")


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("direction", ["d2h", "h2d"])
def test_back_to_back_staged_transfers_keep_their_own_bytes(backend_name, direction):
    """A staged transfer issued while the previous one still uses the staging ring must not overwrite it: the
    first transfer's copies (d2h) or scatters (h2d) are held behind a sleep on their stream while the second runs."""
    from kvport.kernels.torch.gather import gather as ref_gather

    backend = backend_or_skip(backend_name)
    kv, ids, tokens = _kv("vllm-flash-nhd", seed=13)
    d = kv.descriptor
    # Disjoint blocks for the second transfer, so neither can pass for the other.
    other = [sorted(set(range(2 * len(t) + 1)) - set(t))[: len(t)] for t in ids]
    nbytes = d.canonical_bytes(tokens)
    transfer = Transfer(backend, "cuda", CostModel(piece_bytes=-(-nbytes // 2)), native=native_or_none())
    assert 2 <= len(transfer.staged.piece_list(d, tokens)) <= transfer.model.staging_buffers
    first = torch.randint(0, 256, (nbytes,), dtype=torch.uint8).pin_memory()
    second = torch.randint(0, 256, (nbytes,), dtype=torch.uint8).pin_memory()

    def issue(host, table):
        if direction == "d2h":
            return transfer.to_host(d, table, host, tokens, path="staged")
        return transfer.from_host(host, d, table, tokens, path="staged")

    # Warm-up: kernels compiled, tables cached and staging allocated, so nothing below synchronizes the host.
    issue(torch.empty(nbytes, dtype=torch.uint8).pin_memory(), ids).synchronize()
    held = transfer.dma_stream if direction == "d2h" else transfer.kernel_stream
    with torch.cuda.stream(held):
        torch.cuda._sleep(100_000_000)  # ~50 ms
    a = issue(first, ids)
    b = issue(second, other)
    a.synchronize()
    b.synchronize()
    for host, table in ((first, ids), (second, other)):
        expect = torch.empty(nbytes, dtype=torch.uint8)
        ref_gather(d, table, expect, tokens)
        assert torch.equal(host, expect), f"{direction}: a later transfer overwrote staging still in use"


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_pageable_host_chunk_is_refused(backend_name):
    """A kernel cannot reach pageable host memory: a ValueError before launch, not a device fault."""
    backend = backend_or_skip(backend_name)
    kv, ids, tokens = _kv("vllm-flash-nhd", seed=17)
    chunk = torch.zeros(kv.descriptor.canonical_bytes(tokens), dtype=torch.uint8)
    with pytest.raises(ValueError, match="must be pinned"):
        backend.gather(kv.descriptor, ids, chunk, tokens)
    with pytest.raises(ValueError, match="must be pinned"):
        backend.scatter(chunk, kv.descriptor, ids, tokens)
    torch.cuda.synchronize()


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("mode", ["dma", "staged", "staged-stacked", "zero-copy"])
@pytest.mark.parametrize("layout", ["vllm-flash-nhd", "vllm-mla", "deepseek-v4"])
def test_one_move_of_several_chunks_each_in_its_own_buffer(backend_name, mode, layout):
    """Transfer.move: chunks of one request (own block tables, own pinned buffers) in one pipeline, both ways,
    byte-exact against the reference (untouched bytes: test_layout_backend_path)."""
    from kvport.kernels.torch.gather import gather as ref_gather

    backend = backend_or_skip(backend_name)
    native = native_or_none()
    if mode == "dma" and native is None:
        pytest.skip("DMA path needs the native module")
    kv, ids, tokens = _kv(layout, seed=21, extra_tokens=0)
    d = kv.descriptor
    per_chunk = max(g.tokens_per_block for g in d.groups)
    chunks = tokens // per_chunk
    tables = [
        [
            t[i * (per_chunk // g.tokens_per_block) : (i + 1) * (per_chunk // g.tokens_per_block)]
            for g, t in zip(d.groups, ids)
        ]
        for i in range(chunks)
    ]
    # staged: small pieces, so the ring alternates buffers within and across chunks; staged-stacked: pieces of 1 MiB,
    # so several whole chunks go through one stacked launch (kvport.hal.transfer.stacking).
    piece = 1 << 20 if mode == "staged-stacked" else 4096
    mode = "staged" if mode == "staged-stacked" else mode
    transfer = Transfer(backend, "cuda", CostModel(piece_bytes=piece), native=native)
    nbytes = d.canonical_bytes(per_chunk)
    hosts = [torch.zeros(nbytes, dtype=torch.uint8, pin_memory=True) for _ in range(chunks)]
    transfer.move("d2h", d, list(zip(tables, hosts)), per_chunk, path=mode).synchronize()
    for table, host in zip(tables, hosts):
        expect = torch.empty(nbytes, dtype=torch.uint8)
        ref_gather(d, table, expect, per_chunk)
        assert torch.equal(host, expect), "gathered chunk differs from the reference"
    noise = [torch.randint(0, 256, (nbytes,), dtype=torch.uint8).pin_memory() for _ in range(chunks)]
    transfer.move("h2d", d, list(zip(tables, noise)), per_chunk, path=mode).synchronize()
    for table, src in zip(tables, noise):
        back = torch.empty(nbytes, dtype=torch.uint8)
        ref_gather(d, table, back, per_chunk)
        assert torch.equal(back, src), "scattered chunk differs from what was sent"
