"""A staged load issued while the engine's stream is busy (GPU only): its copies into staging run during the engine's
work, its scatters only after it, so the blocks end up holding the loaded bytes even where the engine's earlier
work wrote them; two such loads back to back keep their own bytes through the shared staging buffers, and the second
one's copies do not wait for the first one's scatters (moves rotate through the buffers)."""

from __future__ import annotations

import random
import time

import pytest

torch = pytest.importorskip("torch")

from kvport.hal.transfer.executor import Transfer  # noqa: E402
from kvport.hal.transfer.planner import CostModel  # noqa: E402
from kvport.kernels.torch.gather import gather as ref_gather  # noqa: E402
from kvport.layouts import allocate, load_layout  # noqa: E402
from kvport.testing.gpu import backend_or_skip, native_or_none  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA or ROCm device"),
]

TOKENS = 512
# ~0.5 s at the H200's 1.98 GHz: the engine's work, far longer than the copies into staging (a few MiB).
SLEEP_CYCLES = 1_000_000_000


def _setup(backend_name: str):
    backend = backend_or_skip(backend_name)
    spec = load_layout("vllm-flash-nhd", layers=8)
    per = TOKENS // spec.groups[0].tokens_per_block
    kv = allocate(spec, 2 * per + 1, device="cuda", fill="zeros")
    d = kv.descriptor
    nbytes = d.canonical_bytes(TOKENS)
    piece = -(-nbytes // 3)  # three pieces: the general staged path, not a one-call chunk
    transfer = Transfer(backend, "cuda", CostModel(piece_bytes=piece, min_piece_bytes=piece), native=native_or_none())
    assert len(transfer.staged.piece_list(d, TOKENS)) == 3
    tables = random.Random(5).sample(range(2 * per + 1), 2 * per)
    return kv, d, transfer, [tables[:per], tables[per:]], nbytes


def _warm_up(kv, transfer, d, tables, nbytes) -> None:
    """Steady state, so nothing below waits for the engine's work on the host: the fill kernel loaded (CUDA loads a
    module at its first launch, and that waited for a running kernel: 0.5 s on the H200), and a load of each table
    (its first upload of segment tables syncs the host to the stream)."""
    for storage in kv.storages:
        storage.fill_(0)
    for table in tables:
        transfer.from_host(_host(nbytes, 0), d, table, TOKENS, path="staged").synchronize()


def _host(nbytes: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen).pin_memory()


def _held(kv) -> None:
    """The engine's work: a long kernel, then writes into every block (a forward using blocks reallocated since)."""
    torch.cuda._sleep(SLEEP_CYCLES)
    for storage in kv.storages:
        storage.fill_(0x5A)


def _copies_done_while_engine_busy(transfer) -> tuple[bool, bool]:
    """(the DMA stream drained, the engine still busy), polled for at most 0.3 s."""
    engine = torch.cuda.current_stream()
    deadline = time.monotonic() + 0.3
    while not transfer.dma_stream.query() and time.monotonic() < deadline:  # bounded: the sleep lasts ~0.5 s
        time.sleep(0.001)
    return transfer.dma_stream.query(), not engine.query()


@pytest.mark.parametrize("backend_name", ["cuda", "triton"])
def test_copies_run_during_the_engines_work_and_scatters_after_it(backend_name):
    kv, d, transfer, (table, _), nbytes = _setup(backend_name)
    host = _host(nbytes, 1)
    _warm_up(kv, transfer, d, [table], nbytes)
    torch.cuda.synchronize()
    _held(kv)
    result = transfer.from_host(host, d, table, TOKENS, path="staged")
    copies_done, engine_busy = _copies_done_while_engine_busy(transfer)
    result.completion.wait_on()
    torch.cuda.synchronize()
    assert engine_busy, "the engine's work ended before the check: the test proves nothing on this device"
    assert copies_done, "the copies into staging waited for the engine's work"
    got = torch.empty(nbytes, dtype=torch.uint8)
    ref_gather(d, table, got, TOKENS)
    assert torch.equal(got, host), "the scatter ran before the engine's write"


@pytest.mark.parametrize("backend_name", ["cuda", "triton"])
def test_back_to_back_loads_keep_their_own_bytes(backend_name):
    kv, d, transfer, tables, nbytes = _setup(backend_name)
    hosts = [_host(nbytes, 2), _host(nbytes, 3)]
    _warm_up(kv, transfer, d, tables, nbytes)
    torch.cuda.synchronize()
    _held(kv)
    results = [transfer.from_host(h, d, t, TOKENS, path="staged") for h, t in zip(hosts, tables)]
    for result in results:
        result.completion.wait_on()
    torch.cuda.synchronize()
    for host, table in zip(hosts, tables):
        got = torch.empty(nbytes, dtype=torch.uint8)
        ref_gather(d, table, got, TOKENS)
        assert torch.equal(got, host)


@pytest.mark.parametrize("backend_name", ["cuda", "triton"])
def test_a_second_load_copies_during_the_engines_work_too(backend_name):
    """Two loads issued while the engine works, each of two 256-token chunks in a piece each (two staging buffers of
    a ring of four): the second load's copies run during the engine's work too, not after the first one's scatters,
    and both keep their bytes."""
    kv, d, _, tables, _ = _setup(backend_name)
    half = TOKENS // 2
    per = half // 16
    nbytes = d.canonical_bytes(half)
    model = CostModel(piece_bytes=nbytes, min_piece_bytes=nbytes, staging_buffers=4)
    transfer = Transfer(backend_or_skip(backend_name), "cuda", model, native=native_or_none())
    loads = [
        [(table[:per], _host(nbytes, 4 + 2 * i)), (table[per:], _host(nbytes, 5 + 2 * i))]
        for i, table in enumerate(tables)
    ]
    for load in loads:  # steady state: segment tables compiled, modules loaded (see _warm_up)
        transfer.move("h2d", d, load, half, path="staged").synchronize()
    for storage in kv.storages:
        storage.fill_(0)
    torch.cuda.synchronize()
    _held(kv)
    results = [transfer.move("h2d", d, load, half, path="staged") for load in loads]
    copies_done, engine_busy = _copies_done_while_engine_busy(transfer)
    for result in results:
        result.completion.wait_on()
    torch.cuda.synchronize()
    assert engine_busy, "the engine's work ended before the check: the test proves nothing on this device"
    assert copies_done, "the second load's copies waited for the engine's work"
    for load in loads:
        for table, host in load:
            got = torch.empty(nbytes, dtype=torch.uint8)
            ref_gather(d, table, got, half)
            assert torch.equal(got, host)
