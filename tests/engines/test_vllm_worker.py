"""Worker-side transfers of the vLLM connector on a real CacheEngine (torch backend, real disk tier), without vLLM:
load accounting, the invalid blocks reported for a corrupt chunk, and the test-only random-KV switch."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from kvport.cache import CacheEngine, load_config  # noqa: E402
from kvport.engines.vllm_plan import TransferSpec  # noqa: E402
from kvport.engines.vllm_worker import WorkerSide  # noqa: E402
from kvport.layouts import compile_descriptor, load_layout  # noqa: E402

BLOCK, CHUNK, LAYERS, BLOCKS = 128, 256, 2, 12


def _engine(tmp_path, buf):
    spec = load_layout("vllm-cpu-attn", layers=LAYERS, kv_heads=2, head_dim=32, block_size=BLOCK)
    engine = CacheEngine(load_config(None, {"l2_path": str(tmp_path / "l2"), "l1_bytes": "64MiB"}, environ={}), "ns")
    engine.bind(compile_descriptor(spec, [buf[i] for i in range(LAYERS)]))
    return engine


def _kv():
    return torch.randn(LAYERS, BLOCKS, 2, BLOCK, 64).to(torch.bfloat16)


def test_store_then_load_in_a_fresh_engine(tmp_path) -> None:
    src = _kv()
    tokens = list(range(800))
    with _engine(tmp_path, src) as engine:
        worker = WorkerSide(engine, BLOCK)
        worker.store([TransferSpec("a", tokens, [list(range(7))], 768)])
        assert worker.counters["tokens_stored"] == 768
    dst = torch.zeros_like(src)
    with _engine(tmp_path, dst) as engine:
        worker = WorkerSide(engine, BLOCK)
        worker.load([TransferSpec("b", tokens, [[11, 10, 9, 8, 7, 6, 5]], 768)])
        assert worker.take_invalid_blocks() == set()
        assert worker.counters["tokens_loaded"] == 768 and worker.counters["load_failures"] == 0
        for i, block in enumerate([11, 10, 9, 8, 7, 6]):
            assert torch.equal(dst[:, block], src[:, i])
        assert not dst[:, :6].any()  # block 5 (the tail's) and blocks 0-4 stay untouched


def test_corrupt_chunk_reports_the_blocks_vllm_must_recompute(tmp_path) -> None:
    src = _kv()
    tokens = list(range(800))
    with _engine(tmp_path, src) as engine:
        WorkerSide(engine, BLOCK).store([TransferSpec("a", tokens, [list(range(7))], 768)])
        victim = engine.chunks.tiers[0].path(engine.chunk_keys(tokens)[1])
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    dst = torch.zeros_like(src)
    with _engine(tmp_path, dst) as engine:
        worker = WorkerSide(engine, BLOCK)
        table = [11, 10, 9, 8, 7, 6, 5]
        worker.load([TransferSpec("b", tokens, [table], 768)])
        # Chunk 0 (blocks 11, 10) loaded; chunk 1 failed its checksum, so blocks from 9 on are reported.
        assert worker.take_invalid_blocks() == {9, 8, 7, 6}
        assert worker.take_invalid_blocks() == set()  # reported once
        assert worker.counters["load_failures"] == 1 and worker.counters["tokens_load_failed"] == 512
        assert engine.stats()["failures"] >= 1
        assert torch.equal(dst[:, 11], src[:, 0]) and not dst[:, 9].any()


def test_debug_random_load_overwrites_what_was_loaded(tmp_path) -> None:
    src = _kv()
    tokens = list(range(600))
    with _engine(tmp_path, src) as engine:
        WorkerSide(engine, BLOCK).store([TransferSpec("a", tokens, [list(range(5))], 512)])
    dst = torch.zeros_like(src)
    with _engine(tmp_path, dst) as engine:
        worker = WorkerSide(engine, BLOCK, debug_random_load=True)
        worker.load([TransferSpec("b", tokens, [[4, 5, 6, 7]], 512)])
        assert worker.counters["random_loads"] == 1 and worker.counters["tokens_loaded"] == 512
        for i, block in enumerate([4, 5, 6, 7]):
            assert dst[:, block].any() and not torch.equal(dst[:, block], src[:, i])
            assert torch.isfinite(dst[:, block].float()).all()
        assert not dst[:, :4].any() and not dst[:, 8:].any()


def test_async_load_reports_finished_and_failed_per_request_never_blocks(tmp_path) -> None:
    """Several KV cache groups: failures go out per request (vLLM 0.32 raises on per-block reports there)."""
    src = _kv()
    tokens = list(range(800))
    with _engine(tmp_path, src) as engine:
        WorkerSide(engine, BLOCK).store([TransferSpec("a", tokens, [list(range(7))], 768)])
        victim = engine.chunks.tiers[0].path(engine.chunk_keys(tokens)[2])
    victim.unlink()
    dst = torch.zeros_like(src)
    with _engine(tmp_path, dst) as engine:
        worker = WorkerSide(engine, BLOCK)
        worker.load(
            [
                TransferSpec("ok", tokens, [[11, 10, 9, 8]], 512, load_async=True),
                TransferSpec("short", tokens, [[7, 6, 5, 4, 3, 2]], 768, load_async=True),
            ]
        )
        assert worker.take_transfer_results() == ({"ok", "short"}, {"short"})
        assert worker.take_transfer_results() == (set(), set())  # reported once
        assert worker.take_invalid_blocks() == set()
        assert worker.counters["load_failures"] == 1 and worker.counters["tokens_load_failed"] == 256
        assert torch.equal(dst[:, 11], src[:, 0]) and torch.equal(dst[:, 4], src[:, 3])


def test_async_load_that_raises_is_reported_failed_not_left_waiting(tmp_path) -> None:
    """A load that raises (here: on a closed cache) would leave vLLM waiting for the request forever."""
    engine = _engine(tmp_path, _kv())
    engine.close()
    worker = WorkerSide(engine, BLOCK)
    worker.load([TransferSpec("r", list(range(600)), [[1, 2, 3, 4]], 512, load_async=True)])
    assert worker.take_transfer_results() == ({"r"}, {"r"})
    with pytest.raises(Exception):  # noqa: B017 - the synchronous path keeps raising (vLLM fails the step)
        worker.load([TransferSpec("s", list(range(600)), [[1, 2, 3, 4]], 512)])


def test_async_stores_are_reported_for_finished_requests_only(tmp_path) -> None:
    """The default: stores do not order the engine's stream; a finished request that stored is reported once its
    stores are done (vLLM then frees its blocks), a fenced one or one that stored nothing is not."""
    src = _kv()
    tokens = list(range(800))
    with _engine(tmp_path, src) as engine:
        worker = WorkerSide(engine, BLOCK)
        worker.store([TransferSpec("a", tokens, [list(range(7))], 768), TransferSpec("b", tokens, [[0, 1]], 256)])
        worker.fence(["b"])
        assert worker.finished_stores({"a", "b", "c"}) == {"a"}
        assert worker.finished_stores({"a"}) == set()  # reported once
        stats = worker.stats()["connector"]
        assert stats["stores_reported_done"] == 1 and stats["stores_running"] == 0
        sync = WorkerSide(engine, BLOCK, async_stores=False)
        sync.store([TransferSpec("d", tokens, [list(range(7))], 768)])
        assert sync.finished_stores({"d"}) == set()  # vLLM freed its blocks at once: nothing to report
