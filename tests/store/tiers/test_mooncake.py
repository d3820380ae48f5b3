"""The Mooncake Store tier against a real mooncake_master and storage node (mooncake_client) on 127.0.0.1: zero-copy
round trips from registered memory, the stored object is the sealed envelope, damaged and foreign objects, the
store's eviction, absent/killed/restarted master and storage node, config errors."""

from __future__ import annotations

import importlib.util
import os
import time

import pytest
import torch

from kvport.errors import UserError
from kvport.store.envelope import HEADER_BYTES, seal
from kvport.store.keys import chunk_keys
from kvport.store.metrics import CacheMetrics
from kvport.store.tiers import build_tier, check_tier_spec
from kvport.store.tiers.base import ReadResult
from kvport.testing.servers import MooncakeServer, find_binary

pytestmark = [
    pytest.mark.servers,
    pytest.mark.skipif(
        find_binary("mooncake_master") is None or importlib.util.find_spec("mooncake") is None,
        reason="Mooncake is not installed (nox -s e2e installs mooncake-transfer-engine-non-cuda)",
    ),
]

FP = "layout-fp-1"
N = 256 * 1024


def keys(n: int, salt: str = "mooncake-test") -> list[str]:
    return chunk_keys(list(range(n)), 1, salt)


def payload(seed: int, n: int = N) -> torch.Tensor:
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def make(url: str, **options):
    spec = check_tier_spec({"type": "mooncake", "url": url, **options}, "test")
    return build_tier(spec, "test", CacheMetrics("mooncake-test"))


def wait_up(tier, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not tier.available and time.monotonic() < deadline:
        tier.contains_prefix(keys(1))
        time.sleep(0.05)
    assert tier.available, tier.describe()


def results(futures) -> list:
    return [f.result(timeout=60) for f in futures]


class Raw:
    """Mooncake's own client in this process, to write what kvport would never write."""

    def __init__(self, server: MooncakeServer) -> None:
        from mooncake.store import MooncakeDistributedStore

        self.store = MooncakeDistributedStore()
        assert self.store.setup("127.0.0.1", "P2PHANDSHAKE", 0, 64 << 20, "tcp", "", f"127.0.0.1:{server.port}") == 0

    def set(self, key: str, value: bytes) -> None:
        name = "kvport:" + key
        self.store.batch_remove([name], force=True)
        assert self.store.put(name, value) == 0

    def get(self, key: str) -> bytes:
        return self.store.get("kvport:" + key)

    def exists(self, key: str) -> bool:
        return self.store.is_exist("kvport:" + key) == 1


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with MooncakeServer(tmp_path_factory.mktemp("mooncake")) as srv:
        yield srv


@pytest.fixture(scope="module")
def raw(server):
    client = Raw(server)
    yield client
    client.store.close()


@pytest.fixture(scope="module")
def tier(server):
    t = make(server.url)
    wait_up(t)
    yield t
    t.close()


@pytest.fixture
def memory(tier):
    """Host memory registered with the tier once, as ChunkStore registers L1."""
    mem = torch.zeros(16 * N, dtype=torch.uint8)
    tier.register_memory(mem)
    return [mem[i * N : (i + 1) * N] for i in range(16)]


def test_zero_copy_round_trip_stores_the_sealed_envelope(tier, raw, memory):
    ks = keys(4, "round-trip")
    for i in range(4):
        memory[i].copy_(payload(i))
    skipped = tier.metrics.counter("skipped", tier="mooncake", reason="unregistered_buffer")
    assert results(tier.put(ks, FP, memory[:4])) == [True] * 4
    assert raw.get(ks[0]) == seal(ks[0], FP, payload(0).numpy())  # header then payload, one object
    assert tier.contains_prefix(ks) == 4 and tier.contains_prefix([ks[0], keys(1, "nope")[0]]) == 1
    assert results(tier.get(ks, FP, memory[4:8])) == [ReadResult.HIT] * 4
    assert all(torch.equal(memory[4 + i], payload(i)) for i in range(4))
    # Every buffer was inside registered memory: nothing registered per call.
    assert tier.metrics.counter("skipped", tier="mooncake", reason="unregistered_buffer") == skipped
    assert tier.metrics.counter("bytes", tier="mooncake", op="read") >= 4 * N
    tier.delete(ks[:1])
    assert results(tier.get(ks[:1], FP, memory[8:9])) == [ReadResult.MISS]


def test_buffer_outside_registered_memory_is_registered_for_the_call(tier):
    key = keys(1, "unregistered")[0]
    src, dst = payload(5), torch.zeros(N, dtype=torch.uint8)
    assert results(tier.put([key], FP, [src])) == [True]
    assert results(tier.get([key], FP, [dst])) == [ReadResult.HIT] and torch.equal(src, dst)
    assert tier.metrics.counter("skipped", tier="mooncake", reason="unregistered_buffer") >= 2


def test_damaged_or_foreign_objects_are_misses_counted_and_removed(tier, raw, memory):
    key, other = keys(2, "damaged")
    good = seal(key, FP, payload(7).numpy())
    cases = [
        ("garbage", os.urandom(HEADER_BYTES + N), ReadResult.CORRUPT),
        ("bit flip in the payload", good[:-10] + bytes([good[-10] ^ 1]) + good[-9:], ReadResult.CORRUPT),
        ("truncated", good[: HEADER_BYTES + N // 2], ReadResult.TRUNCATED),
        ("longer than a chunk", good + b"x" * 100, ReadResult.CORRUPT),
        ("another key's chunk", seal(other, FP, payload(7).numpy()), ReadResult.CORRUPT),
    ]
    for label, value, expected in cases:
        raw.set(key, value)
        memory[0].zero_()
        assert results(tier.get([key], FP, memory[:1])) == [expected], label
        assert not raw.exists(key), f"{label}: a bad object must be removed"
        assert tier.metrics.counter("failures", tier="mooncake", reason=expected.value) >= 1
    raw.set(key, seal(key, "another-layout", payload(7).numpy()))
    assert results(tier.get([key], FP, memory[:1])) == [ReadResult.WRONG_FINGERPRINT]
    assert raw.exists(key)  # another layout's chunk is left to its writer


def test_store_eviction_is_a_plain_miss(tmp_path):
    big = 1 << 20
    with MooncakeServer(tmp_path, segment="16MB") as srv:  # the smallest segment a storage node accepts
        tier = make(srv.url)
        wait_up(tier)
        ks = keys(40, "evict")
        srcs = [payload(i, big) for i in range(40)]
        stored = []
        for k, s in zip(ks, srcs):  # 40 MiB into 16 MiB
            stored += results(tier.put([k], FP, [s]))
        dsts = [torch.zeros(big, dtype=torch.uint8) for _ in ks]
        got = results(tier.get(ks, FP, dsts))
        assert set(got) <= {ReadResult.HIT, ReadResult.MISS}, got
        assert got.count(ReadResult.MISS) > 0 and got.count(ReadResult.HIT) > 0
        assert all(torch.equal(s, d) for s, d, r in zip(srcs, dsts, got) if r is ReadResult.HIT)
        # A put the full store refused is counted as dropped, never as served.
        assert tier.metrics.counter("skipped", tier="mooncake", reason="dropped") == stored.count(False)
        tier.close()


def test_absent_at_start_then_reconnects(tmp_path):
    srv = MooncakeServer(tmp_path)
    t0 = time.monotonic()
    tier = make(srv.url, retry_interval=0.2)
    assert time.monotonic() - t0 < 0.5
    time.sleep(0.3)
    assert not tier.available and "down" in tier.describe()
    key = keys(1, "absent")[0]
    assert tier.contains_prefix([key]) == 0
    assert results(tier.get([key], FP, [torch.zeros(N, dtype=torch.uint8)])) == [ReadResult.UNAVAILABLE]
    assert results(tier.put([key], FP, [payload(1)])) == [False]
    with srv:
        wait_up(tier)
        assert results(tier.put([key], FP, [payload(1)])) == [True]
        assert tier.contains_prefix([key]) == 1
    tier.close()


def test_master_killed_mid_run_bounded_then_restarted(tmp_path):
    srv = MooncakeServer(tmp_path).start()
    tier = make(srv.url, timeout=0.3, retry_interval=0.2)
    wait_up(tier)
    ks = keys(4, "master-killed")
    assert results(tier.put(ks[:2], FP, [payload(0), payload(1)])) == [True, True]
    srv.kill_master()
    t0 = time.monotonic()
    found = tier.contains_prefix(ks)
    reads = tier.get(ks[:2], FP, [torch.zeros(N, dtype=torch.uint8) for _ in range(2)])
    for f in reads:  # a request waits at most the tier's bound (ChunkStore waits with tier.timeout_s)
        try:
            f.result(timeout=tier.timeout_s)
        except TimeoutError:
            pass
    lookup_and_read_s = time.monotonic() - t0
    assert found == 0 and lookup_and_read_s < 1.0, lookup_and_read_s
    stored = results(tier.put(ks[2:], FP, [payload(2), payload(3)]))
    assert stored == [False, False]
    assert tier.metrics.counter("skipped", tier="mooncake", reason="dropped") >= 2
    srv.start_master()  # the storage node re-mounts its (now empty) segment with the new master
    deadline = time.monotonic() + 30
    ok = []
    while time.monotonic() < deadline and ok != [True, True]:
        wait_up(tier)
        ok = results(tier.put(ks[2:], FP, [payload(2), payload(3)]))
        time.sleep(0.2)
    assert ok == [True, True]
    dsts = [torch.zeros(N, dtype=torch.uint8) for _ in range(2)]
    assert results(tier.get(ks[2:], FP, dsts)) == [ReadResult.HIT] * 2 and torch.equal(dsts[1], payload(3))
    tier.close()
    srv.stop()


def test_storage_node_killed_reads_fail_fast_then_node_restarted(tmp_path):
    srv = MooncakeServer(tmp_path).start()
    tier = make(srv.url, timeout=0.5, retry_interval=0.2)
    wait_up(tier)
    key = keys(1, "node-killed")[0]
    assert results(tier.put([key], FP, [payload(1)])) == [True]
    srv.node.kill()
    srv.node.wait()
    t0 = time.monotonic()
    got = results(tier.get([key], FP, [torch.zeros(N, dtype=torch.uint8)]))
    assert got[0] is not ReadResult.HIT and time.monotonic() - t0 < 1.0
    srv.start_node()
    deadline = time.monotonic() + 30
    dst = torch.zeros(N, dtype=torch.uint8)
    while time.monotonic() < deadline:
        wait_up(tier)
        if results(tier.put([key], FP, [payload(2)])) == [True]:
            got = results(tier.get([key], FP, [dst]))
            if got == [ReadResult.HIT]:
                break
        time.sleep(0.2)
    assert got == [ReadResult.HIT] and torch.equal(dst, payload(2))
    tier.close()
    srv.stop()


@pytest.mark.parametrize(
    "spec,message",
    [
        ({"type": "mooncake"}, "'url' is required"),
        ({"type": "mooncake", "url": "mooncake://h:1/x"}, "nothing after the port"),
        ({"type": "mooncake", "url": "mooncake://h:99999"}, "url 'mooncake://h:99999'"),
        ({"type": "mooncake", "url": "mooncake://h", "replicas": 0}, "replicas: 0, expected at least 1"),
        ({"type": "mooncake", "url": "mooncake://h", "global_segment_size": "lots"}, "not a byte count"),
        ({"type": "mooncake", "url": "mooncake://h", "rdma": True}, "unknown key 'rdma'"),
    ],
)
def test_config_errors_are_one_line(spec, message):
    with pytest.raises(UserError) as info:
        check_tier_spec(spec, "cache config: tiers[0]")
    assert message in str(info.value) and "\n" not in str(info.value)


def test_url_spec_defaults():
    spec = check_tier_spec("mooncake://127.0.0.1?protocol=tcp", "t")
    assert spec == {"type": "mooncake", "url": "mooncake://127.0.0.1", "protocol": "tcp"}
