"""The L1 share rule for requests larger than the pool (docs/cache.md, "L1: the host pool"): a store never evicts the
request's own earlier chunks, and one request never holds every slot pinned, whether it stores in one call or over
several (vLLM stores a long prompt chunk by chunk as prefill advances)."""

from __future__ import annotations

import threading

import pytest

from kvport.cache import CacheEngine, load_config
from kvport.engines.vllm_plan import SchedulerPlan, StepRequest
from kvport.engines.vllm_worker import WorkerSide
from kvport.hal.backends.torch_ref import TorchBackend
from kvport.store.l1 import SLOT_ALIGN
from kvport.store.tiers import local_disk
from kvport.testing.kv import blocks_equal, nhd_kv

C = 32  # chunk tokens: two 16-token blocks; nhd_kv's default layout makes a 4096-byte chunk (one aligned slot)
SLOTS = 4
LONG = list(range(8 * C))  # twice the pool
SMALL = [50_000 + i for i in range(C)]


def engine_for(tmp_path, desc, **overrides) -> CacheEngine:
    cfg = {"chunk_tokens": C, "l1_bytes": SLOTS * SLOT_ALIGN, "l2_path": None} | overrides
    engine = CacheEngine(load_config(overrides=cfg, environ={}), "l1-share")
    engine.bind(desc, TorchBackend())
    assert engine.l1.num_slots == SLOTS
    return engine


def test_a_request_larger_than_the_pool_keeps_its_prefix_and_leaves_a_slot(tmp_path):
    # The reproduction (L1 only, the default): store(long) then lookup(long) and lookup(small) were both 0.
    src, desc = nhd_kv(seed=3)
    engine = engine_for(tmp_path, desc)
    assert engine.store(SMALL, [20, 21]) == C
    assert engine.store(LONG, list(range(16))) == (SLOTS - 1) * C  # one store pins at most all slots but one
    assert engine.lookup(LONG) == (SLOTS - 1) * C and engine.lookup(SMALL) == C
    stats = engine.stats()
    assert stats["skipped_l1_share"] == 8 - (SLOTS - 1) and stats["evictions"] == 0
    assert engine.l1.pinned_count() == 0
    # what it kept is the request's own prefix, whole: loaded into other blocks, it equals the source blocks
    assert engine.load(LONG, list(range(24, 32)), len(LONG)) == (SLOTS - 1) * C
    assert blocks_equal(src, src, list(range(6)), list(range(24, 30)))
    engine.close()


def test_stores_of_one_request_over_several_steps_never_evict_its_earlier_chunks(tmp_path):
    # Through the vLLM adapter's own planning and worker code: chunked prefill, two chunks per step.
    src, desc = nhd_kv(seed=4)
    engine = engine_for(tmp_path, desc)
    assert engine.store(SMALL, [20, 21]) == C
    plan = SchedulerPlan(engine.lookup, C, 16)
    worker = WorkerSide(engine, 16)
    blocks = [list(range(16))]
    stored = []
    for step in range(4):
        _, stores = plan.build([StepRequest("long", step * 2 * C, 2 * C, blocks)], {"long": LONG})
        assert [(s.skip_tokens, s.num_tokens) for s in stores] == [(step * 2 * C, (step + 1) * 2 * C)]
        before = worker.counters["tokens_stored"]
        worker.store(stores)
        stored.append(worker.counters["tokens_stored"] - before)
    # Steps 1-2 fill the pool (the small request's chunk is the least recently used other chunk); steps 3-4 find
    # every slot holding this request's own earlier chunks and store nothing rather than evict them.
    assert stored == [2 * C, 2 * C, 0, 0]
    assert engine.lookup(LONG) == SLOTS * C and engine.lookup(SMALL) == 0
    assert engine.load(LONG, list(range(24, 32)), len(LONG)) == SLOTS * C
    assert blocks_equal(src, src, list(range(8)), list(range(24, 32)))
    engine.close()


@pytest.fixture
def stalled_disk_writes(monkeypatch):
    """Disk-tier writes wait (holding their L1 pins, as slow writes do) until the returned event is set."""
    release = threading.Event()
    real = local_disk.write_all

    def wait_then_write(fd, buffers):
        release.wait(timeout=60)
        real(fd, buffers)

    monkeypatch.setattr(local_disk, "write_all", wait_then_write)
    yield release
    release.set()


def test_one_request_never_pins_the_whole_pool_across_steps(tmp_path, stalled_disk_writes):
    src, desc = nhd_kv(seed=5)
    engine = engine_for(tmp_path, desc, l2_path=str(tmp_path / "l2"), l2_write_threads=1)
    stored = [  # two steps of one request while its first chunks are still being written to disk (pinned)
        engine.store(LONG, list(range(16)), num_tokens=(step + 1) * 2 * C, skip_tokens=step * 2 * C)
        for step in range(2)
    ]
    assert stored == [2 * C, C]  # the second step gets what is left of the request's share: one chunk, not two
    assert engine.l1.pinned_count() == SLOTS - 1  # one slot stays for loads and other requests
    assert engine.store(SMALL, [20, 21]) == C  # so another request still stores
    stalled_disk_writes.set()
    engine.flush(timeout=60)
    assert engine.lookup(SMALL) == C and engine.lookup(LONG) == 3 * C
    engine.close()
