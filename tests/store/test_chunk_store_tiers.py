"""ChunkStore over real remote tiers: L1 -> local disk -> Redis in order, write-through to every tier, a Redis hit
promoted to the disk tier, a stalled server never holding a load past the tier's bound, L1 registered with Mooncake."""

from __future__ import annotations

import importlib.util
import os
import signal
import time

import pytest
import torch

from kvport.cache.config import load_config
from kvport.store.chunk_store import ChunkStore
from kvport.store.keys import chunk_keys
from kvport.store.tiers.local_disk import LocalDiskTier
from kvport.testing.servers import MooncakeServer, RedisServer, find_binary

pytestmark = pytest.mark.servers
needs_redis = pytest.mark.skipif(
    find_binary("redis-server") is None or importlib.util.find_spec("redis") is None,
    reason="redis-server or the redis client is not installed (nox -s e2e)",
)
needs_mooncake = pytest.mark.skipif(
    find_binary("mooncake_master") is None or importlib.util.find_spec("mooncake") is None,
    reason="Mooncake is not installed (nox -s e2e)",
)

CHUNK = 16  # tokens per chunk
NBYTES = 32 * 1024  # bytes per chunk
FP = "fp-chunk-store"


def make_store(tiers, namespace="ns", **overrides) -> ChunkStore:
    config = load_config(overrides={"chunk_tokens": CHUNK, "l1_bytes": "1MiB", "tiers": tiers, **overrides}, environ={})
    store = ChunkStore(config, namespace)
    store.open_l1(NBYTES, FP, lambda n: torch.empty(n, dtype=torch.uint8))
    return store


def wait_up(store: ChunkStore) -> None:
    deadline = time.monotonic() + 20
    while not all(getattr(t, "available", True) for t in store.tiers) and time.monotonic() < deadline:
        for tier in store.tiers:
            tier.contains_prefix(chunk_keys(list(range(CHUNK)), CHUNK, "probe"))
        time.sleep(0.05)
    assert all(getattr(t, "available", True) for t in store.tiers), [t.describe() for t in store.tiers]


def fill(store: ChunkStore, tokens: list[int]) -> list[torch.Tensor]:
    """Store every chunk of ``tokens`` with recognisable bytes; returns what each chunk holds."""
    written = []
    leases = []
    for i, key in enumerate(store.keys(tokens)):
        lease = store.reserve(key)
        data = torch.randint(0, 256, (NBYTES,), dtype=torch.uint8, generator=torch.Generator().manual_seed(i))
        lease.buffer.copy_(data)
        written.append(data)
        leases.append(lease)
    store.admit(leases)
    store.flush(timeout=30)
    return written


def fetch_all(store: ChunkStore, keys: list[str]) -> list:
    out = []
    for got in store.fetch(keys):
        out.append(None if got is None else got.buffer.clone())
        if got is not None:
            got.release()
    return out


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    if find_binary("redis-server") is None:
        pytest.skip("redis-server is not installed (nox -s e2e)")
    with RedisServer(tmp_path_factory.mktemp("redis")) as srv:
        yield srv


@needs_redis
def test_write_through_and_promotion_from_redis_to_disk(tmp_path, redis_server):
    tokens = list(range(4 * CHUNK))
    disk = {"type": "local_disk", "path": str(tmp_path / "disk-a")}
    writer = make_store([disk, redis_server.url])
    wait_up(writer)
    written = fill(writer, tokens)
    keys = writer.keys(tokens)
    client = redis_server.client()
    assert all(client.exists(b"kvport:" + k.encode()) for k in keys)  # written through to both tiers
    assert all(LocalDiskTier(tmp_path / "disk-a", 1 << 30).path(k).is_file() for k in keys)
    writer.close()

    # A second engine: its own (empty) L1 and disk, the same Redis. Redis hits are promoted into its disk tier.
    reader = make_store([{"type": "local_disk", "path": str(tmp_path / "disk-b")}, redis_server.url])
    wait_up(reader)
    assert reader.lookup(tokens) == 4
    assert reader.metrics.counter("hits", op="lookup", tier="redis") == 4
    got = fetch_all(reader, keys)
    assert all(g is not None and torch.equal(g, w) for g, w in zip(got, written))
    assert reader.metrics.counter("hits", op="load", tier="redis") == 4
    assert reader.metrics.counter("misses", op="load", tier="local_disk") == 4
    reader.flush(timeout=30)
    disk_b = LocalDiskTier(tmp_path / "disk-b", 1 << 30)
    assert all(disk_b.path(k).is_file() for k in keys), "a Redis hit must be promoted to the faster disk tier"
    reader.close()

    # A third engine on disk-b alone: the promoted chunks are whole and valid there.
    third = make_store([{"type": "local_disk", "path": str(tmp_path / "disk-b")}])
    got = fetch_all(third, keys)
    assert all(g is not None and torch.equal(g, w) for g, w in zip(got, written))
    third.close()


@needs_redis
def test_stalled_server_turns_loads_into_misses_within_the_bound(tmp_path, redis_server):
    srv = RedisServer(tmp_path / "stall").start()
    store = make_store([{"type": "redis", "url": srv.url, "timeout": 0.3, "retry_interval": 0.2}], prefetch_depth=4)
    wait_up(store)
    tokens = list(range(100, 100 + 3 * CHUNK))
    fill(store, tokens)
    keys = store.keys(tokens)
    for key in keys:  # drop L1 so the load must go to Redis
        assert store.l1.discard(key)
    os.kill(srv.proc.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        assert store.lookup(tokens) == 0
        got = fetch_all(store, keys)
        elapsed = time.monotonic() - t0
    finally:
        os.kill(srv.proc.pid, signal.SIGCONT)
    assert got[0] is None and elapsed < 1.0, elapsed
    assert "down" in store.stats()["tiers"][0]
    wait_up(store)
    got = fetch_all(store, keys)
    assert all(g is not None for g in got)  # back to hits, same engine, nothing restarted
    store.close()
    srv.stop()


@needs_mooncake
def test_l1_is_registered_with_mooncake_once(tmp_path):
    with MooncakeServer(tmp_path) as srv:
        store = make_store([srv.url])
        wait_up(store)
        tier = store.tiers[0]
        assert tier._covered(store.l1.memory)
        tokens = list(range(2 * CHUNK))
        written = fill(store, tokens)
        for key in store.keys(tokens):
            assert store.l1.discard(key)
        got = fetch_all(store, store.keys(tokens))
        assert all(g is not None and torch.equal(g, w) for g, w in zip(got, written))
        assert tier.metrics.counter("skipped", tier="mooncake", reason="unregistered_buffer") == 0
        assert store.metrics.counter("hits", op="load", tier="mooncake") == 2
        store.close()


@needs_mooncake
def test_stalled_storage_node_read_is_a_miss_in_bound_and_its_slot_is_kept_until_it_ends(tmp_path):
    """SIGSTOP on the node holding the data: Mooncake's own transfer waits ~30 s (measured). The load gives up at the
    tier's bound; the L1 slot the transfer writes into stays reserved (pinned, invisible) until the call returns."""
    with MooncakeServer(tmp_path) as srv:
        store = make_store([{"type": "mooncake", "url": srv.url, "timeout": 0.3}], prefetch_depth=1)
        wait_up(store)
        tokens = list(range(CHUNK))
        fill(store, tokens)
        key = store.keys(tokens)[0]
        assert store.l1.discard(key)
        os.kill(srv.node.pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            got = fetch_all(store, [key])
            elapsed = time.monotonic() - t0
            assert got == [None] and elapsed < 0.8, elapsed
            assert store.metrics.counter("failures", tier="mooncake", reason="timeout") == 1
            assert store.l1.pinned_count() == 1 and not store.l1.contains(key)  # still the transfer's
        finally:
            os.kill(srv.node.pid, signal.SIGCONT)
        deadline = time.monotonic() + 60
        while store.l1.pinned_count() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert store.l1.pinned_count() == 0 and not store.l1.contains(key)  # released once the call ended
        store.close()
