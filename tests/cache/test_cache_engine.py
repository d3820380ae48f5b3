"""Tests for kvport.cache.engine with the torch backend: round trips, longest prefix across L1/L2, partial chunks,
corrupt chunks stopping a load, exhaustion, async handles, close, metrics, bind-time user errors."""

from __future__ import annotations

import shutil

import pytest
import torch

from kvport.cache import CacheEngine, load_config
from kvport.errors import UserError
from kvport.hal.backends.torch_ref import TorchBackend
from kvport.store.tiers.local_disk import HEADER_BYTES
from kvport.testing.kv import blocks_equal, nhd_kv, two_group_kv

C = 32  # chunk tokens: two 16-token blocks


def make_engine(tmp_path, namespace="model-a|tp0/1", desc=None, **overrides):
    cfg = {"chunk_tokens": C, "l1_bytes": "1MiB", "l2_path": str(tmp_path / "l2")} | overrides
    engine = CacheEngine(load_config(overrides=cfg, environ={}), namespace)
    if desc is not None:
        engine.bind(desc, TorchBackend())
    return engine


def test_round_trip_into_other_blocks(tmp_path):
    src, sdesc = nhd_kv(seed=1)
    tokens = list(range(100))  # 3 full chunks + a 4-token tail
    with make_engine(tmp_path, desc=sdesc) as engine:
        assert engine.store(tokens, list(range(7))) == 96
    dst, ddesc = nhd_kv()
    with make_engine(tmp_path, desc=ddesc) as engine:  # fresh process-like engine: L1 empty, L2 only
        assert engine.lookup(tokens) == 96
        dst_blocks = [20, 3, 9, 11, 30, 31, 5]
        assert engine.load(tokens, dst_blocks, 100) == 96
        assert blocks_equal(src, dst, list(range(6)), dst_blocks[:6])
        untouched = [b for b in range(32) if b not in dst_blocks[:6]]
        assert all(torch.count_nonzero(t[:, untouched]) == 0 for t in dst)  # nothing written elsewhere
        assert engine.stats()["hits_load_local_disk"] == 3


def test_two_groups_with_different_block_sizes(tmp_path):
    src, sdesc = two_group_kv(seed=2)
    tokens = list(range(128))
    tables_src = [list(range(8)), [4, 5]]  # 128 tokens: 8 blocks of 16, 2 blocks of 64
    with make_engine(tmp_path, desc=sdesc, chunk_tokens=64) as engine:
        assert engine.store(tokens, tables_src) == 128
    dst, ddesc = two_group_kv()
    tables_dst = [[9, 8, 7, 6, 5, 4, 3, 2], [0, 1]]
    with make_engine(tmp_path, desc=ddesc, chunk_tokens=64) as engine:
        assert engine.load(tokens, tables_dst, 128) == 128
    assert torch.equal(src[0][tables_src[0]], dst[0][tables_dst[0]])
    assert torch.equal(src[1][tables_src[1]], dst[1][tables_dst[1]])


def test_longest_prefix_across_l1_and_l2(tmp_path):
    src, sdesc = nhd_kv(seed=3)
    tokens = list(range(C * 4))
    engine = make_engine(tmp_path, desc=sdesc)
    engine.store(tokens, list(range(8)))
    engine.flush()
    keys = engine.chunk_keys(tokens)
    assert engine.l1.discard(keys[0]) and engine.l1.discard(keys[1])  # chunks 0,1: L2 only
    engine.chunks.tiers[0].delete_one(keys[2])  # chunk 2: L1 only
    engine.l1.discard(keys[3])
    engine.chunks.tiers[0].delete_one(keys[3])  # chunk 3: nowhere
    assert engine.lookup(tokens) == 3 * C
    scheduler = make_engine(tmp_path)  # lookup-only (scheduler side, no bind): sees the shared L2 only
    assert scheduler.lookup(tokens) == 2 * C
    loaded_blocks = [10, 11, 12, 13, 14, 15, 16, 17]
    # load through the same engine (its L1 holds chunk 2) into other blocks of the same memory
    expected = [t.clone() for t in src]
    for t in src:
        t[:, 10:18].zero_()
    assert engine.load(tokens, loaded_blocks, len(tokens)) == 3 * C
    assert blocks_equal(expected, src, list(range(6)), loaded_blocks[:6])
    assert all(torch.count_nonzero(t[:, 16:18]) == 0 for t in src)  # chunk 3 not loaded
    engine.close()
    scheduler.close()


def test_prefix_change_misses_from_changed_chunk(tmp_path):
    src, sdesc = nhd_kv(seed=4)
    with make_engine(tmp_path, desc=sdesc) as engine:
        tokens = list(range(C * 3))
        engine.store(tokens, list(range(6)))
        changed = tokens[:]
        changed[C + 5] = -1
        assert engine.lookup(changed) == C
        assert engine.lookup(tokens[: C * 2 + 7]) == 2 * C


def test_namespace_and_salt_isolation(tmp_path):
    src, sdesc = nhd_kv(seed=5)
    tokens = list(range(C * 2))
    with make_engine(tmp_path, desc=sdesc) as engine:
        engine.store(tokens, list(range(4)))
    for other in (make_engine(tmp_path, namespace="model-a|tp1/2"), make_engine(tmp_path, salt="tenant-b")):
        with other:
            assert other.lookup(tokens) == 0
    with make_engine(tmp_path) as same:
        assert same.lookup(tokens) == 2 * C


def test_store_skips_present_and_skip_tokens(tmp_path):
    src, sdesc = nhd_kv(seed=6)
    tokens = list(range(C * 3))
    with make_engine(tmp_path, desc=sdesc) as engine:
        assert engine.store(tokens, list(range(6)), num_tokens=C * 2) == 2 * C
        assert engine.store(tokens, list(range(6))) == C  # only the new chunk
        assert engine.stats()["skipped_present"] == 2
    with make_engine(tmp_path / "b", desc=nhd_kv(seed=6)[1]) as engine:
        assert engine.store(tokens, list(range(6)), skip_tokens=C + 5) == 2 * C  # chunk 0 skipped
        assert engine.lookup(tokens) == 0  # chunk 0 missing: chunks 1,2 unreachable by prefix


def test_corrupt_chunk_stops_load_without_touching_its_blocks(tmp_path):
    src, sdesc = nhd_kv(seed=7)
    tokens = list(range(C * 3))
    with make_engine(tmp_path, desc=sdesc) as engine:
        engine.store(tokens, list(range(6)))
        keys = engine.chunk_keys(tokens)
        path = engine.chunks.tiers[0].path(keys[1])
    with open(path, "r+b") as fh:
        fh.seek(HEADER_BYTES + 100)
        fh.write(b"\xff\x00\xff")
    dst, ddesc = nhd_kv()
    for prefetch in (True, False):
        with make_engine(tmp_path, desc=ddesc, prefetch=prefetch) as engine:
            assert engine.load(tokens, list(range(6)), C * 3) == C
            assert blocks_equal(src, dst, [0, 1], [0, 1])
            assert all(torch.count_nonzero(t[:, 2:6]) == 0 for t in dst)
            assert engine.lookup(tokens) == C  # the bad chunk was deleted
    assert not path.exists()


def test_l1_exhaustion_skips_store_and_load_uses_scratch(tmp_path):
    src, sdesc = nhd_kv(seed=8)
    chunk_bytes = sdesc.canonical_bytes(C)
    tokens = list(range(C * 3))
    engine = make_engine(tmp_path, desc=sdesc, l1_bytes=2 * 4096, l2_path=None)
    assert engine.chunk_bytes == chunk_bytes and engine.l1.num_slots == 2
    pins = [engine.l1.reserve("x1"), engine.l1.reserve("x2")]  # every slot pinned (e.g. readers in flight)
    assert engine.store(tokens, list(range(6))) == 0  # skipped, no exception, no allocation
    assert engine.stats()["skipped_l1_exhausted"] >= 1
    for p in pins:
        engine.l1.abort(p)
    engine.close()
    # with L2: a load while L1 is fully pinned still works through the single scratch buffer
    with make_engine(tmp_path, desc=sdesc) as writer:
        writer.store(tokens, list(range(6)))
    dst, ddesc = nhd_kv()
    reader = make_engine(tmp_path, desc=ddesc, l1_bytes=2 * 4096)
    pins = [reader.l1.reserve("x1"), reader.l1.reserve("x2")]
    assert reader.load(tokens, list(range(6)), C * 3) == C * 3
    assert blocks_equal(src, dst, list(range(6)), list(range(6)))
    for p in pins:
        reader.l1.abort(p)
    reader.close()


def test_async_store_and_load_handles(tmp_path):
    src, sdesc = nhd_kv(seed=9)
    tokens = list(range(C * 4))
    with make_engine(tmp_path, desc=sdesc) as engine:
        handle = engine.submit_store(tokens, list(range(8)))
        assert handle.wait(timeout=30) == 4 * C and handle.done()
    dst, ddesc = nhd_kv()
    with make_engine(tmp_path, desc=ddesc) as engine:
        assert engine.prefetch(tokens).wait(timeout=30) == 4 * C
        assert engine.stats()["l1_chunks"] == 4
        handle = engine.submit_load(tokens, list(range(8)), C * 4)
        assert handle.wait(timeout=30) == 4 * C
        assert engine.stats()["hits_load_l1"] == 4  # served from L1 after the prefetch
    assert blocks_equal(src, dst, list(range(8)), list(range(8)))


def test_sync_store_writes_local_disk_before_returning(tmp_path):
    src, sdesc = nhd_kv(seed=10)
    tokens = list(range(C * 2))
    engine = make_engine(tmp_path, desc=sdesc, async_store=False)
    engine.store(tokens, list(range(4)))
    assert all(engine.chunks.tiers[0].contains_one(k) for k in engine.chunk_keys(tokens))
    engine.close()


def test_close_drains_and_blocks_further_use(tmp_path):
    src, sdesc = nhd_kv(seed=11, num_blocks=64)
    tokens = list(range(C * 30))
    engine = make_engine(tmp_path, desc=sdesc, io_threads=1)
    engine.store(tokens, list(range(60)))
    engine.close()
    with make_engine(tmp_path) as reader:
        assert reader.lookup(tokens) == 30 * C
    with pytest.raises(RuntimeError, match="closed"):
        engine.lookup(tokens)


def test_close_without_drain_leaves_whole_chunks_or_none(tmp_path):
    src, sdesc = nhd_kv(seed=12, num_blocks=64)
    tokens = list(range(C * 30))
    engine = make_engine(tmp_path, desc=sdesc, io_threads=1)
    engine.store(tokens, list(range(60)))
    engine.close(drain=False)
    dst, ddesc = nhd_kv(num_blocks=64)
    with make_engine(tmp_path, desc=ddesc) as reader:
        n = reader.load(tokens, list(range(60)), len(tokens))
        assert n % C == 0
        assert blocks_equal(src, dst, list(range(n // 16)), list(range(n // 16)))
        assert reader.stats()["failures"] == 0


def test_bind_rejects_bad_chunk_size_and_tiny_l1(tmp_path):
    _, desc = nhd_kv()
    with pytest.raises(UserError, match="chunk_tokens=40 is not a multiple.*tokens_per_block=16"):
        make_engine(tmp_path, chunk_tokens=40).bind(desc, TorchBackend())
    with pytest.raises(UserError, match="l1_bytes=100 is smaller than one chunk"):
        make_engine(tmp_path, l1_bytes=100).bind(desc, TorchBackend())


def test_bind_selects_backend_from_registry_and_requires_bind(tmp_path):
    _, desc = nhd_kv()
    engine = make_engine(tmp_path)
    with pytest.raises(RuntimeError, match="bind"):
        engine.load([1] * C, [0, 1], C)
    engine.bind(desc)
    from kvport.hal.platform import detect_platform
    from kvport.hal.registry import select_backend

    assert engine.backend.name == select_backend(detect_platform(), desc).name  # whatever the registry picks here
    engine.close()
    forced = make_engine(tmp_path, backend="torch")  # config.backend forces a registry name
    forced.bind(desc)
    assert forced.backend.name == "torch"
    forced.close()


def test_prometheus_exposition(tmp_path):
    from prometheus_client import generate_latest

    src, sdesc = nhd_kv(seed=13)
    with make_engine(tmp_path, namespace="prom-test", desc=sdesc) as engine:
        engine.store(list(range(C)), [0, 1])
        engine.lookup(list(range(C)))
        text = generate_latest().decode()
    assert 'kvport_cache_hits_total{cache="prom-test",op="lookup",tier="l1"} 1.0' in text
    assert 'kvport_cache_latency_seconds_count{cache="prom-test",op="lookup"} 1.0' in text


def test_local_disk_write_failure_is_counted_and_l1_still_serves(tmp_path):
    src, sdesc = nhd_kv(seed=14)
    tokens = list(range(C * 2))
    engine = make_engine(tmp_path, desc=sdesc)
    l2_root = tmp_path / "l2"
    engine.chunks.tiers[0].ready.result(timeout=30)  # the start-up pass may still be creating its lock file there
    shutil.rmtree(l2_root)  # (holds the namespace name file)
    l2_root.write_text("not a directory any more")  # every chunk write now fails with an OSError
    assert engine.store(tokens, list(range(4))) == 2 * C  # the caller is not failed by a background write
    engine.flush()
    stats = engine.stats()
    assert stats["failures_local_disk_write_io_error"] == 2
    assert engine.lookup(tokens) == 2 * C  # still in L1
    engine.close()


def test_metrics_are_served_by_the_host_process_not_the_engine(tmp_path):
    import socket
    import urllib.request

    from kvport.store.metrics import serve_metrics

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with make_engine(tmp_path, namespace="http-test", metrics_port=port) as engine:
        engine.lookup(list(range(C)))
        with socket.socket() as probe:  # the cache engine itself opened no port
            assert probe.connect_ex(("127.0.0.1", port)) != 0
        serve_metrics(port)  # what an adapter or server process does
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert 'kvport_cache_misses_total{cache="http-test",op="lookup",tier="all"} 1.0' in body


def test_l1_smaller_than_an_aligned_slot_is_rejected(tmp_path):
    _, desc = nhd_kv(block_size=16, heads=1, head_dim=2, layers=1)  # a chunk of 256 bytes, slot of 4 KiB
    chunk = desc.canonical_bytes(C)
    with pytest.raises(UserError, match="smaller than one chunk"):
        make_engine(tmp_path, l1_bytes=chunk).bind(desc, TorchBackend())
    engine = make_engine(tmp_path, l1_bytes=4096)
    engine.bind(desc, TorchBackend())
    assert engine.l1.num_slots == 1
    engine.close()


def test_concurrent_loads_and_stores_with_a_tiny_l1(tmp_path):
    """Four loader threads and a storer share one engine whose L1 holds 3 chunks: constant eviction, pins,
    scratch fallbacks. Every load must be complete and byte-exact."""
    import random
    import threading

    kv, desc = nhd_kv(num_blocks=64, seed=15)
    slot = 4096
    engine = make_engine(tmp_path, desc=desc, l1_bytes=3 * slot, prefetch_depth=2)

    def source_blocks(j: int) -> list[int]:
        start = (4 * j) % 16
        return list(range(start, start + 4))

    def seq(j: int) -> list[int]:
        return [j * 1000 + t for t in range(2 * C)]

    for j in range(8):
        assert engine.store(seq(j), source_blocks(j)) == 2 * C
        engine.flush()  # queued L2 writes pin their L1 slots: with 3 slots, wait before the next store
    errors: list[str] = []

    def loader(t: int) -> None:
        rng = random.Random(t)
        region = list(range(16 + 8 * t, 16 + 8 * t + 4))
        for _ in range(25):
            j = rng.randrange(8)
            n = engine.load(seq(j), region, 2 * C)
            if n != 2 * C:
                errors.append(f"thread {t}: loaded {n} of sequence {j}")
            elif not blocks_equal(kv, kv, source_blocks(j), region):
                errors.append(f"thread {t}: wrong bytes for sequence {j}")

    def storer() -> None:
        for j in range(8, 16):
            engine.store(seq(j), source_blocks(j))

    threads = [threading.Thread(target=loader, args=(t,)) for t in range(4)] + [threading.Thread(target=storer)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    engine.flush()
    assert errors == []
    assert engine.l1.pinned_count() == 0  # every pin released
    assert engine.stats()["evictions_l1"] > 0
    engine.close()


def test_bounded_local_disk_queue_drops_to_l1_only_never_blocks(tmp_path):
    src, sdesc = nhd_kv(num_blocks=64, heads=8, head_dim=64, seed=16)  # 128 KiB chunks: writes lag the gathers
    tokens = list(range(C * 30))
    engine = make_engine(tmp_path, desc=sdesc, l1_bytes="16MiB", max_pending_stores=1, l2_write_threads=1)
    assert engine.store(tokens, list(range(60))) == 30 * C  # every chunk gathered into L1, none refused
    engine.flush()
    keys = engine.chunk_keys(tokens)
    on_disk = sum(engine.chunks.tiers[0].contains_one(k) for k in keys)
    dropped = engine.stats().get("skipped_tier_queue_full", 0)
    assert on_disk + dropped == 30  # each chunk either written or counted as dropped, never lost silently
    assert on_disk >= 1
    assert all(engine.l1.contains(k) for k in keys)  # dropped chunks still serve from L1
    engine.close()


def test_close_without_drain_counts_writes_it_drops(tmp_path):
    """close(drain=False) while tier writes are queued: each chunk is either written or counted as dropped,
    never cancelled silently; the chunks stay whole or absent on disk."""
    import time

    src, sdesc = nhd_kv(seed=17)
    tokens = list(range(C * 4))
    engine = make_engine(tmp_path, desc=sdesc, l2_write_threads=1)
    real_put = engine.chunks.tiers[0].put_one
    engine.chunks.tiers[0].put_one = lambda *a: time.sleep(0.2) or real_put(*a)  # writes lag: a queue builds up
    assert engine.store(tokens, list(range(8))) == 4 * C
    engine.close(drain=False)
    on_disk = sum(engine.chunks.tiers[0].contains_one(k) for k in engine.chunk_keys(tokens))
    assert engine.stats()["skipped_dropped_at_close"] >= 1
    assert on_disk + engine.stats()["skipped_dropped_at_close"] == 4


def test_flush_timeout_raises_while_writes_are_pending(tmp_path):
    import time

    src, sdesc = nhd_kv(seed=18)
    tokens = list(range(C * 2))
    engine = make_engine(tmp_path, desc=sdesc, l2_write_threads=1)
    real_put = engine.chunks.tiers[0].put_one
    engine.chunks.tiers[0].put_one = lambda *a: time.sleep(0.3) or real_put(*a)
    engine.store(tokens, list(range(4)))
    with pytest.raises(TimeoutError):
        engine.flush(timeout=0.05)  # like Handle.wait: a timeout is reported, never a silent early return
    engine.flush()
    assert all(engine.chunks.tiers[0].contains_one(k) for k in engine.chunk_keys(tokens))
    engine.close()


def test_a_pinned_transfer_path_on_a_synchronous_platform_is_one_line(tmp_path):
    _, desc = nhd_kv()
    engine = make_engine(tmp_path, transfer_path="dma")
    with pytest.raises(UserError, match="transfer_path=dma: moves on cpu are synchronous"):
        engine.bind(desc, TorchBackend())
    engine.close()
