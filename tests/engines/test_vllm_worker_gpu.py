"""Asynchronous stores of the vLLM worker on the GPU: a fence orders the engine's stream after a store still reading
blocks the next forward rewrites, and a finished request is reported only once its stores are done."""

from __future__ import annotations

import pytest
import torch

from kvport.cache import CacheEngine, load_config
from kvport.engines.vllm_plan import TransferSpec
from kvport.engines.vllm_worker import WorkerSide
from kvport.layouts import allocate, load_layout
from kvport.testing.gpu import backend_or_skip, reference_gather

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA or ROCm device"),
]

CHUNK, BLOCK, CHUNKS = 256, 16, 4
# ~0.5 s at the H200's 1.98 GHz: the stores queue behind it, so the rewrite below is issued while they wait.
SLEEP_CYCLES = 1_000_000_000


def _warm_up(worker: WorkerSide, table: list[int], tokens: int) -> None:
    """Steady state: a store of other tokens in the same shape compiles its segment tables (their first upload
    syncs the host to the stream), then the host waits for it."""
    worker.store([TransferSpec("warm-up", [5] * (tokens + 1), [table], tokens)])
    torch.cuda.synchronize()
    assert worker.finished_stores({"warm-up"}) == {"warm-up"}


@pytest.mark.parametrize(("backend_name", "path"), [("cuda", "dma"), ("cuda", "staged"), ("triton", "staged")])
def test_fence_orders_the_rewrite_after_the_store(tmp_path, backend_name, path) -> None:
    backend = backend_or_skip(backend_name)
    spec = load_layout("vllm-flash-nhd", layers=8)
    blocks = CHUNKS * CHUNK // BLOCK
    src = allocate(spec, blocks + 1, device="cuda", generator=torch.Generator().manual_seed(3))
    table = list(range(blocks))
    tokens = list(range(CHUNKS * CHUNK + 5))
    expected = reference_gather(src.descriptor, [table], CHUNKS * CHUNK)
    overrides = {"chunk_tokens": CHUNK, "l1_bytes": "512MiB", "l2_path": str(tmp_path), "transfer_path": path}
    cfg = load_config(overrides=overrides, environ={})
    with CacheEngine(cfg, "async-store") as writer:
        writer.bind(src.descriptor, backend)
        worker = WorkerSide(writer, BLOCK)
        _warm_up(worker, table, CHUNKS * CHUNK)
        torch.cuda._sleep(SLEEP_CYCLES)  # the forward that computed the KV
        worker.store([TransferSpec("r", tokens, [table], CHUNKS * CHUNK)])
        assert worker.stats()["connector"]["stores_running"] == 1  # waiting behind the forward
        worker.fence(["r"])  # vLLM preempted "r" and hands its blocks to the next forward...
        for storage in src.storages:  # ...which rewrites them
            storage.random_(0, 256)
        assert worker.counters["fenced_running_stores"] >= 1
        torch.cuda.synchronize()
        writer.flush()
    dst = allocate(spec, blocks + 1, device="cuda", fill="zeros")
    with CacheEngine(cfg, "async-store") as reader:
        reader.bind(dst.descriptor, backend)
        assert reader.load(tokens, [table], CHUNKS * CHUNK) == CHUNKS * CHUNK
    torch.cuda.synchronize()
    got = reference_gather(dst.descriptor, [table], CHUNKS * CHUNK)
    assert torch.equal(got, expected), f"{int((got != expected).sum())} of {got.numel()} bytes differ"


def test_finished_request_reported_once_its_store_is_done(tmp_path) -> None:
    backend = backend_or_skip("cuda")
    spec = load_layout("vllm-flash-nhd", layers=8)
    src = allocate(spec, CHUNK // BLOCK + 1, device="cuda", generator=torch.Generator().manual_seed(4))
    cfg = load_config(overrides={"chunk_tokens": CHUNK, "l1_bytes": "256MiB", "l2_path": str(tmp_path)}, environ={})
    with CacheEngine(cfg, "async-report") as engine:
        engine.bind(src.descriptor, backend)
        worker = WorkerSide(engine, BLOCK)
        _warm_up(worker, list(range(CHUNK // BLOCK)), CHUNK)
        torch.cuda._sleep(SLEEP_CYCLES)
        worker.store([TransferSpec("r", list(range(CHUNK + 1)), [list(range(CHUNK // BLOCK))], CHUNK)])
        assert worker.finished_stores({"r"}) == set()  # behind the forward: vLLM must keep the blocks
        assert worker.stats()["connector"]["stores_running"] == 1
        torch.cuda.synchronize()
        for _ in range(2000):  # bounded: the store's completion is an event query after the device finished
            reported = worker.finished_stores(set())
            if reported:
                break
        assert reported == {"r"}
