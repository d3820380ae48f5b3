"""Tests for kvport.store.tiers.local_disk: format validation (checksum, truncation, fingerprint), deletion of bad
chunks, capacity eviction and temp files of dead writers, on real files."""

from __future__ import annotations

import fcntl
import os

import pytest
import torch

from kvport.errors import UserError
from kvport.store.keys import chunk_keys
from kvport.store.metrics import CacheMetrics
from kvport.store.tiers.base import ReadResult
from kvport.store.tiers.local_disk import HEADER_BYTES, TMP_PREFIX, LocalDiskTier

FP = "layout-fp-1"
N = 64 * 1024


def keys(n: int) -> list[str]:
    return chunk_keys(list(range(n)), 1, "disk-test")


def payload(seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (N,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def tier(tmp_path):
    return LocalDiskTier(tmp_path / "l2", capacity_bytes=1 << 30, metrics=CacheMetrics("disk-test"))


def test_round_trip_and_file_layout(tier):
    key = keys(1)[0]
    src = payload(1)
    assert tier.put_one(key, FP, src)
    path = tier.path(key)
    assert path.exists() and path.stat().st_size == HEADER_BYTES + N
    assert tier.contains_one(key)
    dst = torch.empty(N, dtype=torch.uint8)
    assert tier.get_one(key, FP, dst) is ReadResult.HIT
    assert torch.equal(src, dst)
    assert not [p for p in path.parent.iterdir() if p.name.startswith(TMP_PREFIX)]


def test_missing_chunk_is_a_plain_miss(tier):
    assert tier.get_one(keys(1)[0], FP, torch.empty(N, dtype=torch.uint8)) is ReadResult.MISS
    assert tier.metrics.counter("failures") == 0


def _corrupt(path, offset: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0x40]))


@pytest.mark.parametrize(
    "damage,expected",
    [
        (lambda p: _corrupt(p, HEADER_BYTES + N // 2), ReadResult.CORRUPT),  # payload bit flip
        (lambda p: _corrupt(p, 0), ReadResult.CORRUPT),  # magic
        (lambda p: _corrupt(p, 40), ReadResult.CORRUPT),  # key inside the header
        (lambda p: os.truncate(p, HEADER_BYTES + N - 1), ReadResult.TRUNCATED),
        (lambda p: os.truncate(p, 10), ReadResult.TRUNCATED),
        (lambda p: open(p, "ab").write(b"x"), ReadResult.CORRUPT),  # trailing garbage
    ],
)
def test_damaged_chunk_is_a_miss_deleted_and_counted(tier, damage, expected):
    key = keys(1)[0]
    tier.put_one(key, FP, payload(2))
    damage(tier.path(key))
    dst = torch.zeros(N, dtype=torch.uint8)
    assert tier.get_one(key, FP, dst) is expected
    assert not tier.path(key).exists()
    assert tier.metrics.counter("failures", tier="local_disk", reason=expected.value) == 1
    assert tier.get_one(key, FP, dst) is ReadResult.MISS  # gone for good, never served


def test_wrong_fingerprint_is_a_miss_and_the_writers_chunk_stays(tier):
    key = keys(1)[0]
    tier.put_one(key, FP, payload(3))
    assert tier.get_one(key, "another-layout", torch.empty(N, dtype=torch.uint8)) is ReadResult.WRONG_FINGERPRINT
    assert tier.contains_one(key)  # a reader with another layout never deletes a valid chunk
    assert tier.metrics.counter("failures", reason="wrong_fingerprint") == 1
    dst = torch.empty(N, dtype=torch.uint8)
    assert tier.get_one(key, FP, dst) is ReadResult.HIT and torch.equal(dst, payload(3))


def test_batched_calls_answer_a_prefix_and_return_futures(tier):
    ks = keys(4)
    stored = tier.put(ks[:3], FP, [payload(i) for i in range(3)])
    assert [f.result(timeout=10) for f in stored] == [True, True, True]
    assert [f.result(timeout=10) for f in tier.put(ks[:1], FP, [payload(0)])] == [None]  # present: nothing written
    assert tier.contains_prefix(ks) == 3 and tier.contains_prefix([ks[3], ks[0]]) == 0
    dsts = [torch.empty(N, dtype=torch.uint8) for _ in ks]
    results = [f.result(timeout=10) for f in tier.get(ks, FP, dsts)]
    assert results == [ReadResult.HIT] * 3 + [ReadResult.MISS]
    assert all(torch.equal(dsts[i], payload(i)) for i in range(3))
    assert tier.metrics.counter("bytes", tier="local_disk", op="write") == 3 * N


@pytest.mark.parametrize("bad", ["../x", "ab/cd", "A" * 64, "0" * 63, "", "0" * 64 + "/"])
def test_keys_are_validated_at_the_tier_api(tier, tmp_path, bad):
    outside = tmp_path / "x.kvc"
    outside.write_bytes(b"victim")
    with pytest.raises(ValueError, match="not a kvport chunk key"):
        tier.get([bad], FP, [torch.empty(N, dtype=torch.uint8)])
    with pytest.raises(ValueError, match="not a kvport chunk key"):
        tier.delete([bad])
    with pytest.raises(ValueError, match="not a kvport chunk key"):
        tier.put([bad], FP, [payload(0)])
    assert outside.read_bytes() == b"victim"


def test_wrong_expected_length_is_rejected(tier):
    key = keys(1)[0]
    tier.put_one(key, FP, payload(4))
    assert tier.get_one(key, FP, torch.empty(N - 1, dtype=torch.uint8)) is ReadResult.CORRUPT


def test_file_copied_under_another_key_is_rejected(tier):
    k1, k2 = keys(2)
    tier.put_one(k1, FP, payload(5))
    tier.path(k2).parent.mkdir(exist_ok=True)
    os.link(tier.path(k1), tier.path(k2))
    assert tier.get_one(k2, FP, torch.empty(N, dtype=torch.uint8)) is ReadResult.CORRUPT


def test_capacity_evicts_least_recently_used(tmp_path):
    chunk = HEADER_BYTES + N
    tier = LocalDiskTier(tmp_path / "l2", capacity_bytes=5 * chunk, metrics=CacheMetrics("cap"))
    ks = keys(8)
    for i, key in enumerate(ks[:5]):
        tier.put_one(key, FP, payload(i))
        os.utime(tier.path(key), (1000 + i, 1000 + i))  # deterministic age order: ks[0] oldest
    os.utime(tier.path(ks[0]), (2000, 2000))  # ks[0] used recently -> ks[1] is now the oldest
    tier.put_one(ks[5], FP, payload(5))  # 6 chunks > capacity: evict down to 90%
    assert tier.usage() <= 5 * chunk
    assert tier.contains_one(ks[0]) and not tier.contains_one(ks[1]) and tier.contains_one(ks[5])
    assert tier.metrics.counter("evictions", tier="local_disk") >= 1


def test_read_refreshes_recency(tmp_path):
    chunk = HEADER_BYTES + N
    tier = LocalDiskTier(tmp_path / "l2", capacity_bytes=3 * chunk)
    ks = keys(4)
    for i, key in enumerate(ks[:3]):
        tier.put_one(key, FP, payload(i))
        os.utime(tier.path(key), (1000 + i, 1000 + i))
    assert tier.get_one(ks[0], FP, torch.empty(N, dtype=torch.uint8)) is ReadResult.HIT
    tier.put_one(ks[3], FP, payload(3))
    assert tier.contains_one(ks[0]) and not tier.contains_one(ks[1])


def test_temp_files_no_writer_holds_are_removed_at_once_held_ones_kept(tier):
    key = keys(1)[0]
    tier.put_one(key, FP, payload(6))
    dead = tier.path(key).parent / f"{TMP_PREFIX}{key}.1.dead"
    live = tier.path(key).parent / f"{TMP_PREFIX}{key}.2.live"
    dead.write_bytes(b"partial")  # fresh: nobody waits for it to age
    live.write_bytes(b"partial")
    with open(live, "rb") as writer:
        fcntl.flock(writer, fcntl.LOCK_EX)  # what a writer holds on its temp file until it links or unlinks it
        tier.enforce_capacity()
        assert not dead.exists() and live.exists() and tier.contains_one(key)
    tier.enforce_capacity()
    assert not live.exists() and tier.contains_one(key)


def test_unwritable_root_is_a_user_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="local_disk tier"):
        LocalDiskTier(blocker / "sub", 1 << 20)
